// Package client is the Go client of fwpd: everything fwpctl does, for Go
// programs. A Client holds one session for its lifetime; a dynamic
// session's objects vanish when the client closes or its process dies.
//
// Errors from the daemon match the typed errors of packages engine and
// mgmt with errors.Is (engine.ErrNotFound, mgmt.ErrAccessDenied,
// mgmt.ErrTimeout, ...) and, for QueryRedirect, the proxy package's.
//
// ProxyBackend, registered with proxy.Register, lets a proxy without root
// read its accepted connections' redirect records and context through fwpd,
// and put records on its outbound sockets so they are not redirected again:
// proxy.SetRedirectRecords on a *net.Dialer makes its Control hook pass the
// socket (SCM_RIGHTS) with the records to fwpd on RecordsSocket, a second
// unix socket beside the main one, since gRPC cannot carry a descriptor.
// Holding the socket proves it is the caller's; fwpd checks that it is an
// unconnected TCP or UDP socket and that the caller (SO_PEERCRED) is root or
// the target process of the redirect the records end with, then marks it by
// its SO_COOKIE as ebpf.ProxyBackend would.
//
// RegisterCallout registers a callout's functions with fwpd from this
// process, on CalloutSocket, a third socket with a lean framing
// (internal/calloutwire) chosen over gRPC for latency: fwpd's engine then
// calls them for every classification it makes, exactly as an embedded
// callout, and unregisters them when the connection ends. Classifier
// classifies through fwpd's engine (remote callouts included) and lists
// the registrations.
package client
