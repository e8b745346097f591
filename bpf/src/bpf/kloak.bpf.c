// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Kloak's BPF programs: one translation unit, so one object and one skeleton.
 * Each header holds one job's maps, helpers and programs.
 *
 * Phase 1 (tls_write_enter) runs on entry to a TLS library's write function,
 * filters by cgroup, captures buffer and length into per-CPU scratch and tail
 * calls phase 2. Phase 2 scans the whole buffer with bpf_loop for "kloak:",
 * verifies every candidate against secret_map byte for byte, and then either
 * stops the thread for the agent to patch (pause backend, lockdown-safe) or
 * writes the real bytes itself (in-place backend, needs bpf_probe_write_user).
 *
 * The wire backend (wire.h) stops nobody: phase 2 leaves the hits for the
 * thread's socket writes, which arm XOR patches by TCP sequence number,
 * and tc programs apply them to the encrypted records on the wire.
 *
 * Anything uncertain leaves the buffer alone: a full ring buffer, a token
 * that matches nothing, a scratch slot clobbered by another task.
 *
 * The include order is the order programs and bpf_loop callbacks are laid
 * out in their sections; keeping it keeps the object's code unchanged.
 */
#include "maps.h"
#include "scan.h"
#include "events.h"
#include "tls_write.h"
#include "scrub.h"
#include "process.h"
#include "conn.h"
#include "ssl_fd.h"
#include "dns.h"

char LICENSE[] SEC("license") = "GPL";

/* BTF holds the types of globals, and the skeleton's Rust types come from
 * BTF: one zero instance of each record and enum the Rust side reads. */
struct conn_event _conn_event_type = {};
struct obj_key _obj_key_type = {};
struct tls_event _event_type = {};
struct dns_event _dns_event_type = {};
struct conn_val _conn_val_type = {};
enum kloak_limits _kloak_limits_type = 0;
enum write_abi _write_abi_type = 0;
enum fd_arg _fd_arg_type = 0;
enum event_kind _event_kind_type = 0;
enum event_flag _event_flag_type = 0;
enum conn_kind _conn_kind_type = 0;
enum addr_family _addr_family_type = 0;
enum stat_idx _stat_idx_type = 0;
struct allow_key _allow_key_type = {};
struct flow_key _flow_key_type = {};
enum allow_val _allow_val_type = 0;
enum wire_suite _wire_suite_type = 0;
enum secret_flag _secret_flag_type = 0;
