// Command proxycallout is a Go port of the scenario of WFPSampler's proxy
// callouts, on fwp's in-process datapath: a connect-redirect callout
// (inline, or asynchronous with -async) sends connections to a server's
// port to a local proxy and stores the original destination as redirect
// context; the proxy queries the records and the context, dials the
// original destination with the records set — so the callout sees its own
// proxy's connection as REDIRECTED_BY_SELF and lets it through — and
// splices both ways. Everything runs on loopback in one process:
//
//	go run ./examples/proxycallout [-async] [-bytes N]
package main
