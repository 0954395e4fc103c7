// Package testutil holds helpers for privileged tests: RequireRoot (skip
// without root locally, fail in CI), the cgroup v2 hierarchy found from
// /proc/mounts, child cgroups the test creates and removes, and helper
// processes — the test binary re-executed — started inside a child cgroup
// and a fresh network namespace, so tests never touch the host's root
// cgroup or its network. UnixListener and DialUnix give tests a unix
// socket in a path short enough, and a bounded connection to it.
package testutil
