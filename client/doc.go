// Package client is the Go client of fwpd: everything fwpctl does, for Go
// programs. A Client holds one session for its lifetime; a dynamic
// session's objects vanish when the client closes or its process dies.
//
// Errors from the daemon match the typed errors of packages engine and
// mgmt with errors.Is (engine.ErrNotFound, mgmt.ErrAccessDenied,
// mgmt.ErrTimeout, ...) and, for QueryRedirect, the proxy package's.
//
// ProxyBackend, registered with proxy.Register, lets a proxy without root
// read its accepted connections' redirect records and context through fwpd.
package client
