// Package busypoll reads a unix socket with a bounded busy poll before
// blocking, as SO_BUSY_POLL does for network devices: while an answer is
// expected soon, the reading goroutine retries non-blocking reads for a
// short window instead of parking in the runtime's poller, so that the
// answer's arrival does not have to wake a thread on an idle CPU (on a
// virtual machine, a halted vCPU's wake-up is most of a local round trip).
//
// The spin happens only while a caller says an answer is awaited (Begin,
// End) or, in linger mode, for a window after the last data read: an idle
// connection blocks as before and costs no CPU.
package busypoll
