package proxy

import "errors"

// The kernel datapath answers the proxy API itself, as socket options a
// cgroup hook answers from its maps (WFP's are socket ioctls): a proxy in
// any language needs two calls and no daemon. The ABI (docs/sockopt.md):
//
//	level SOL_FWP = 0x667770 ("fwp")
//	optname                     call                         value
//	1 FWP_SO_REDIRECT_RECORDS   getsockopt, accepted socket  records: "fwpk" + up to 8 uint32 handles (LE), at most 36 bytes
//	                            setsockopt, outbound socket  the same bytes, before connect
//	2 FWP_SO_REDIRECT_CONTEXT   getsockopt, accepted socket  the redirect's context bytes, at most 128 (ENODATA: none)
//	3 FWP_SO_ORIGINAL_DST       getsockopt, accepted socket  struct sockaddr_in or sockaddr_in6
//	4 FWP_SO_REDIRECT_QUERY     getsockopt, accepted socket  all three at once: 196 bytes,
//	                                                         orig[28] (sockaddr_in or _in6),
//	                                                         u16 records_len, u16 context_len (0: none),
//	                                                         records[36], context[128]
//
// Errors: ENOENT (no redirect recorded for the socket), EACCES (the
// caller is neither the redirect's target process nor root), EINVAL (a
// buffer too small for the value, or records that are not the kernel's).
// ENOPROTOOPT or EOPNOTSUPP: no hook answers for this socket (no kernel
// datapath, or the socket was created in a cgroup without its proxy hooks).
const (
	SolFWP                 = 0x667770
	SoFWPRedirectRecords   = 1
	SoFWPRedirectContext   = 2
	SoFWPOriginalDst       = 3
	SoFWPRedirectQuery     = 4
	KernelQuerySize        = 28 + 2 + 2 + KernelRecordsMax + KernelContextMax
	KernelRecordsMax       = 4 + 4*8
	KernelContextMax       = 128
	kernelRecordsMagic     = "fwpk"
	kernelRecordsMinLength = 8
)

// errNoContext: the redirect set no context (ENODATA).
var errNoContext = errors.New("fwp proxy: the redirect set no context")

// errNoHook: no kernel hook answered the socket option for this socket;
// the registered backends may know it.
var errNoHook = errors.New("fwp proxy: no kernel hook answers for this socket")

// kernelRecords reports whether records are the kernel datapath's, which
// the setsockopt takes.
func kernelRecords(b []byte) bool {
	return len(b) >= kernelRecordsMinLength && len(b) <= KernelRecordsMax && len(b)%4 == 0 && string(b[:4]) == kernelRecordsMagic
}
