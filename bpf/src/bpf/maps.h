/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * State more than one job reads or writes: the loader's settings, the
 * tracking and secret maps, the stats, the scrub hand-over between a write's
 * entry and its return, and which socket each TLS object writes to.
 */
#ifndef KLOAK_MAPS_H
#define KLOAK_MAPS_H

#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "kloak.h"

/* Set by the loader through rodata. */
const volatile __u32 cfg_scrub = 1;
const volatile __u32 cfg_agent_tgid = 0;
/* The network namespace (inode number) whose processes pause may serve
 * SECRET_WIRE_RULES secrets; 0: none. */
const volatile __u32 cfg_pause_netns = 0;
/* bpf_ktime_get_ns() when the agent loaded the programs. */
const volatile __u64 cfg_loaded_ns = 0;
/* Experimental: PEND_DEFERRED and PEND_SUFFIX writes (wire.h); 0 sends them
 * to pause. */
const volatile __u32 cfg_wire_implicit = 0;
/* "kloak:" HPACK Huffman-coded starting at bit offset a (0-7) of a byte: the
 * first three bytes it fully covers. Computed by the loader from the HPACK
 * table; all zero disables the Huffman search. */
const volatile __u8 cfg_huff_sig[8][3] = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct secret_key);
	__type(value, struct secret_val);
} secret_map SEC(".maps");

/* cgroup v2 ids whose processes are ours to rewrite. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} tracked_cgroups SEC(".maps");

/* Processes tracked by pid, for containers that exist only in cgroup v1
 * hierarchies (no cgroup v2 id to match): tgid, or the tid of a thread a
 * tracked process created, -> the agent's id for the container. Forks are
 * followed here; exits remove. LRU: under pressure an entry goes, and that
 * process's placeholders go out unchanged. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} tracked_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Hits a thread's current write carries, for the scrub on return. */
struct pending {
	__u64 buf;
	__u32 nmatch;
	__u32 _pad;
	struct hit match[MAX_HITS];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct pending);
} pending_scrub SEC(".maps");

/* (tgid, SSL*) -> socket fd, from SSL_set_fd or the first socket write of a handshake. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct obj_key);
	__type(value, __s32);
} ssl_fd SEC(".maps");

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += n;
}

static __always_inline bool tracked(void)
{
	__u64 pt = bpf_get_current_pid_tgid();
	__u32 tgid = pt >> 32;
	if (tgid == cfg_agent_tgid)
		return false;
	__u64 cg = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&tracked_cgroups, &cg))
		return true;
	return bpf_map_lookup_elem(&tracked_pids, &tgid) != 0;
}

/* What events report as the writer's group: the container id the agent
 * gave a pid-tracked process, else the cgroup v2 id. */
static __always_inline __u64 current_group(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 *g = bpf_map_lookup_elem(&tracked_pids, &tgid);
	return g ? *g : bpf_get_current_cgroup_id();
}

static __always_inline struct obj_key obj_key_of(__u64 ptr)
{
	struct obj_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, ._pad = 0, .ptr = ptr };
	return k;
}

static __always_inline __s32 ssl_to_fd(__u64 ssl)
{
	struct obj_key k = obj_key_of(ssl);
	__s32 *fd = bpf_map_lookup_elem(&ssl_fd, &k);
	return fd ? *fd : -1;
}

#endif
