// Package testutil holds helpers for privileged tests: RequireRoot (skip
// without root locally, fail in CI), the cgroup v2 hierarchy found from
// /proc/mounts, child cgroups the test creates and removes, and helper
// processes — the test binary re-executed — started inside a child cgroup
// and a fresh network namespace, so tests never touch the host's root
// cgroup or its network.
package testutil
