// Package proxy is the user-mode side of WFP connection redirection (seeds
// 000 and 001) as Go functions on connections and dialers.
//
//	WFP (Winsock ioctl)                          fwp
//	SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS    QueryRedirectRecords(conn)
//	SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT    QueryRedirectContext(conn)
//	SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS      SetRedirectRecords(dialer, records)
//	(UDP, one unconnected socket)                QueryDatagramRedirectRecords(pc, from)
//	                                             QueryDatagramRedirectContext(pc, from)
//
// A proxy that a connect-redirect callout sent a connection to queries the
// records (opaque bytes) and the callout's context (usually the original
// destination) on the accepted connection, then sets the records on the
// dialer of its outbound connection, so the callout sees that connection
// as REDIRECTED_BY_SELF and lets it through instead of looping.
//
// A UDP proxy usually receives many clients' datagrams on one unconnected
// socket: the datagram variants find the redirect by that socket and the
// datagram's source address as ReadFrom returned it.
//
// The package does not know any datapath. A connection whose datapath knows
// its redirect implements [Accepted] (fwp's in-process datapath does), a
// packet socket [AcceptedDatagrams]; a dialer that can carry records
// implements [RecordsSetter]; a kernel datapath (eBPF) plugs in with
// [Register] and answers for plain net.Conns and *net.Dialers by socket
// cookie or 4-tuple, and, as a [DatagramBackend], for plain
// net.PacketConns by local address and source.
//
// With fwp's kernel datapath the queries and SetRedirectRecords on a
// *net.Dialer are socket options answered in the kernel (getsockopt and
// setsockopt at level SolFWP; docs/sockopt.md), tried before any
// registered backend: no daemon round trip per connection.
// QueryKernelRedirect returns records, context and original destination
// in one call.
//
// Errors mirror the ioctls' meaning: [ErrNotFound] (not a redirected
// connection), [ErrInvalidArgument], [ErrNotSupported] (no datapath can do
// it for this connection or dialer) and [ErrAccessDenied] (the caller is
// not the process the callout named as local redirect target).
package proxy
