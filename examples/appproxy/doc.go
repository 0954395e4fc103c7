// Command appproxy is a VPN-style per-application redirect as a remote
// callout: it registers a CONNECT_REDIRECT callout with fwpd and sends each
// application's connections to the local proxy its route names, with the
// original destination as the redirect context, the proxy's pid as the
// redirect target, and fwpd's redirect records, so that the proxy's own
// connection to the original destination is not redirected again (the
// redirect-state check of engine.ConnectRedirect).
//
//	go run ./examples/appproxy -route /usr/bin/curl=127.0.0.1:3128@4242 -route /usr/bin/wget=127.0.0.1:3129
//
// A route is APP=PROXY[@PID]: connections whose ale_app_id is APP go to
// PROXY; PID is the proxy's process (the redirect target allowed to read
// the records and context). Other applications are left alone. It adds its
// callout objects and filters (CONNECT_REDIRECT v4 and v6) in a dynamic
// session: they go when it exits, and a connection classified while it is
// gone is not redirected (PERMIT_IF_CALLOUT_UNREGISTERED).
//
// The proxy side is examples/redirectproxy: with fwpd's kernel datapath it
// reads each accepted connection's records and context through fwpd (the
// proxy API) and dials the original destination with the records set.
package main
