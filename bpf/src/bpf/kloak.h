/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Everything that crosses the kernel boundary: record layouts and the
 * numbers in them. The Rust side gets these through the skeleton's BTF
 * types (kloak.bpf.c keeps one global of each, so BTF holds them), so a
 * number is written here and nowhere else; src/layout_tests.rs checks the
 * Rust side's use of each against the object's BTF.
 */
#ifndef KLOAK_H
#define KLOAK_H

/* Enumerators rather than macros: only typed values reach BTF. */
enum kloak_limits {
	PREFIX_LEN = 6,         /* "kloak:" */
	MIN_SECRET_LEN = 8,
	MAX_SECRET_LEN = 128,   /* bytes of placeholder (and of value) a map entry holds */
	KEY_LEN = 8,            /* random characters right after the prefix */
	MAX_HITS = 8,           /* placeholders handled by the kernel per write */
};

/* The uprobe cookie of a TLS write probe: its low byte names the ABI. */
enum write_abi {
	ABI_SSL_WRITE = 1,      /* int SSL_write(SSL *, const void *, int) */
	ABI_SSL_WRITE_EX = 2,   /* int SSL_write_ex(SSL *, const void *, size_t, size_t *) */
	ABI_GO_TLS_WRITE = 3,   /* Go register ABI: RAX recv, RBX buf ptr, RCX len */
	ABI_GNUTLS_SEND = 4,    /* ssize_t gnutls_record_send2(session, const void *, size_t, ...) */
	ABI_RUSTLS_WRITE = 5,   /* <rustls Writer as io::Write>::write(&mut self, &[u8]): RSI ptr, RDX len */
	ABI_SSL_HANDSHAKE = 17, /* SSL_connect / SSL_do_handshake(SSL *): the thread's next socket write names the fd */
	ABI_MASK = 0xff,
	/* Flag: the process's TLS keys can be learned (OpenSSL 3's libcrypto,
	 * whose EVP_KDF_derive the wire backend probes, is this library's):
	 * a write that starts before its handshake has ended can wait for
	 * them on the wire instead of going to pause. */
	ABI_KEYS = 0x100,
};

/* The uprobe cookie of an fd setter: which register holds the (sending) fd. */
enum fd_arg {
	FD_ARG_RSI = 1,       /* SSL_set_fd(ssl, fd), gnutls_transport_set_ptr(session, ptr) */
	FD_ARG_RDX = 2,       /* gnutls_transport_set_int2/ptr2(session, recv, send) */
};

/* Event kinds on tls_events. STOP kinds leave the writing thread stopped. */
enum event_kind {
	EV_REWRITE = 1,      /* STOP: patch the listed hits, then continue */
	EV_SCAN = 2,         /* STOP: the kernel could not read (part of) the buffer or hit overflow; scan it from user space */
	EV_SCRUB = 3,        /* STOP: the library returned; put the placeholders back */
	EV_EXEC = 4,         /* STOP: a tracked process exec'd; look at its image */
	EV_MMAP = 5,         /* STOP: a tracked process mapped an unknown file executable */
	EV_REWRITTEN = 6,    /* in-place backend replaced the hits itself */
	EV_SCRUBBED = 7,     /* in-place backend restored the placeholders itself */
	EV_UNKNOWN = 8,      /* a kloak: token matched no secret; it went out unchanged */
	EV_EXIT = 9,         /* a tracked process exited: its libraries may have lost their last user */
	EV_SPLIT = 10,       /* the write ends inside what looks like a placeholder: hits[0] holds where, its length and the random characters seen; it went out unchanged */
	EV_ARMED = 11,       /* wire backend: the listed hits are armed for patching in the record on the wire */
	EV_HELD = 12,        /* wire backend: the listed hits' destination is not allowed; they go out unchanged */
	EV_WIRE_MISS = 13,   /* wire backend: the records did not match the write; the listed hits go out unchanged */
	EV_DECIDE = 14,      /* STOP: wire backend, no decision yet for this destination: decide, then continue (no patch) */
	EV_REQUIRE_WIRE = 15, /* the listed hits are of require-wire secrets and the wire could not serve this write: they went out unchanged */
};

#define DNS_MAX_PAYLOAD 512

/* TLS cipher suites the wire backend patches, as the ServerHello names them. */
enum wire_suite {
	SUITE_TLS13_AES_128_GCM = 0x1301,
	SUITE_TLS13_AES_256_GCM = 0x1302,
	SUITE_TLS13_CHACHA20 = 0x1303,
};

/* Address families as the kernel numbers them, in conn_val and dns_event. */
enum addr_family {
	AF_INET = 2,
	AF_INET6 = 10,
};

/* A DNS answer to a tracked process's query (UDP, source port 53): from
 * the packet the kernel received (tgid: the task that sent the query), or,
 * on the fallback path, from the receive syscall (tgid: the reader). */
struct dns_event {
	__u64 ts_ns;
	__u32 tgid;
	__u16 family;       /* enum addr_family */
	__be16 port;        /* source port, network order */
	__u8 addr[16];      /* source address */
	__u32 len;          /* bytes of payload captured */
	__u32 _pad;
	__u8 payload[DNS_MAX_PAYLOAD];
};

struct conn_key {
	__u32 tgid;
	__s32 fd;
};

/* Destination of a connected socket, from connect(2). */
struct conn_val {
	__u64 ts_ns;        /* when connect(2) returned */
	__u16 family;       /* enum addr_family */
	__be16 port;
	__u32 _pad;
	__u8 addr[16];
};

enum conn_kind {
	CONN_OPEN = 1,
	CONN_CLOSE = 2,
	CONN_SSL = 3,       /* a TLS object (obj) was bound to socket fd */
};

/* A tracked socket connected or closed: the agent mirrors conn_ip_map
 * from these, so a restarted agent knows where open sockets go. */
struct conn_event {
	__u32 kind;         /* enum conn_kind */
	__u32 tgid;
	__s32 fd;
	__u32 _pad;
	__u64 obj;
	struct conn_val v;  /* zero unless CONN_OPEN */
	__u64 group;        /* the process's group, as tls_event.cgroup */
};

/* A TLS object or BIO of one process: pointers are only unique within an
 * address space, and forked workers share their heap layout. */
struct obj_key {
	__u32 tgid;
	__u32 _pad;
	__u64 ptr;
};

/* Slots of the per-CPU stats array. */
enum stat_idx {
	ST_WRITES = 0,       /* TLS writes scanned */
	ST_BYTES = 1,        /* bytes scanned */
	ST_HITS = 2,         /* placeholders matched */
	ST_UNKNOWN = 3,      /* kloak: tokens that matched nothing */
	ST_LOST = 4,         /* events dropped because the ring buffer was full */
	ST_UNREADABLE = 5,   /* writes with a page the kernel could not read */
	ST_OVERFLOW = 6,     /* writes with more than MAX_HITS prefixes */
	ST_TAILCALL_FAIL = 7,
	ST_STOPS = 8,        /* SIGSTOPs sent */
	ST_WRITE_FAIL = 9,   /* in-place writes the kernel refused */
	ST_HUFFMAN = 10,     /* writes with a Huffman-coded prefix candidate */
	ST_SPLIT = 11,       /* writes ending inside a placeholder-like token */
	ST_WIRE_ARMED = 12,  /* placeholders armed for a patch on the wire */
	ST_WIRE_PACKETS = 13,/* packets the tc program patched */
	ST_WIRE_MISS = 14,   /* placeholders the wire backend could not place in a record */
	ST_WIRE_FULL = 15,   /* placeholders not armed: the connection's patch slots were all in use */
	ST_WIRE_DROPS = 16,  /* packets dropped because a patch could not be applied (TCP resends them) */
	ST_WIRE_FALLBACK = 17, /* writes the wire could not serve, paused instead */
	ST_WIRE_UNPROVEN = 18, /* ChaCha20 records no sequence number near the estimate re-tagged: left unpatched */
	ST_REQUIRE_WIRE = 19,  /* placeholders of require-wire secrets sent unchanged: only the wire may serve them, and it could not */
	ST_DNS_QUERIES = 20,   /* DNS queries tracked sockets sent, recorded for their answers */
	ST_DNS_ANSWERS = 21,   /* answers that matched their socket's query, handed to the agent */
	ST_DNS_MISMATCH = 22,  /* replies on a recorded query's socket and id from another address or port, or too late: ignored */
	ST_DNS_FOREIGN = 23,   /* queries from sockets in a network namespace an unprivileged user may own: not recorded */
	ST_MAX = 24,
};

struct secret_key {
	__u8 b[KEY_LEN];
};

/* Bits of secret_val.flags. */
enum secret_flag {
	/* Only the wire backend may serve this secret: no other backend ever
	 * writes its value into an application's memory. */
	SECRET_REQUIRE_WIRE = 1,
	/* The secret has destination rules and the wire backend is loaded:
	 * only the wire serves it, except to a process in cfg_pause_netns (the
	 * host's network namespace under the node agent, whose packets cross
	 * no veth the wire could patch on). The pause fallback would put the
	 * value into the application's memory on any write it chose to make
	 * one the wire cannot serve, and from there it goes anywhere. */
	SECRET_WIRE_RULES = 2,
};

struct secret_val {
	__u32 len;
	__u32 id;
	__u32 flags;        /* enum secret_flag bits */
	__u32 _pad;
	__u8 placeholder[MAX_SECRET_LEN];
	/* Only filled for the in-place backend; the pause backend keeps values out of the kernel. */
	__u8 value[MAX_SECRET_LEN];
};

struct inode_key {
	__u64 dev;  /* kernel dev_t: major << 20 | minor */
	__u64 ino;
};

struct hit {
	__u32 off;   /* offset in the write buffer */
	__u32 id;    /* secret id; 0 for an unmatched prefix */
	__u32 len;
	__u32 _pad;
	struct secret_key key;
};

struct tls_event {
	__u64 ts_ns;
	__u64 cgroup;
	__u64 buf;
	__u64 len;
	__u64 cookie;
	__u64 dev;
	__u64 ino;
	__u32 kind;         /* enum event_kind */
	__u32 tgid;
	__u32 tid;
	__u32 nhits;
	__u32 flags;        /* enum event_flag bits */
	__s32 fd;           /* socket the write goes to; -1 when unknown */
	char comm[16];
	struct hit hits[MAX_HITS];
};

/* Bits of tls_event.flags. */
enum event_flag {
	EVF_UNREADABLE = 1,
	EVF_OVERFLOW = 2,
	EVF_HUFFMAN = 4,    /* an HPACK Huffman-coded "kloak:" may be in the buffer */
};

#endif
