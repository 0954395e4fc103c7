//go:build linux

// (Named to sort before kernel_e2e_test.go, whose init runs the helpers:
// its helper must be registered first.)

package main_test

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/internal/testutil"
)

func init() {
	testutil.RegisterHelper("squidscenario", squidScenarioHelper)
}

// squidPolicy sends TCP port 80 (v4 and v6) to squid's intercept ports.
// No target_pid: squid is an unmodified proxy that only asks
// SO_ORIGINAL_DST, which answers whoever holds the socket.
const squidPolicy = `lifetime: persistent
providers:
  - {key: acme, name: ACME}
provider_contexts:
  - {key: to-squid4, provider: acme, data: '{"proxy":"127.0.0.1:3140"}'}
  - {key: to-squid6, provider: acme, data: '{"proxy":"[::1]:3140"}'}
callouts:
  - {key: fwp.builtin.connect_redirect/squid4, provider: acme, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
  - {key: fwp.builtin.connect_redirect/squid6, provider: acme, layer: ALE_CONNECT_REDIRECT_V6, flags: [uses_provider_context]}
filters:
  - key: http4-to-squid
    layer: ALE_CONNECT_REDIRECT_V4
    conditions: [{field: ip_remote_port, match: equal, value: 80}, {field: ip_protocol, match: equal, value: 6}]
    action: callout_unknown
    callout: fwp.builtin.connect_redirect/squid4
    provider_context: to-squid4
  - key: http6-to-squid
    layer: ALE_CONNECT_REDIRECT_V6
    conditions: [{field: ip_remote_port, match: equal, value: 80}, {field: ip_protocol, match: equal, value: 6}]
    action: callout_unknown
    callout: fwp.builtin.connect_redirect/squid6
    provider_context: to-squid6
`

// squidConf is a minimal intercepting squid: no cache, no DNS it could
// reach (so a Host header cannot route anything), everything in dir.
func squidConf(dir string) string {
	return fmt.Sprintf(`http_port 127.0.0.1:3141
http_port 127.0.0.1:3140 intercept
http_port [::1]:3140 intercept
http_access allow all
cache deny all
cache_mem 0 MB
pid_filename %[1]s/squid.pid
access_log stdio:%[1]s/access.log squid
cache_log %[1]s/cache.log
cache_store_log none
coredump_dir %[1]s
dns_nameservers 127.0.0.1
dns_timeout 2 seconds
hosts_file none
pinger_enable off
shutdown_lifetime 0 seconds
cache_effective_user proxy
`, dir)
}

type squidResult struct {
	V4, V6    string
	AccessLog string
}

// squidScenarioHelper runs in squid's cgroup and a new network namespace:
// origin web servers on 127.0.0.1:80 and [::1]:80, squid (args[1], its
// files in args[2]) in intercept mode, and curl in the clients' cgroup
// (args[0]) sending a forged, unresolvable Host header to each origin.
func squidScenarioHelper(args []string) error {
	clientCg, squid, dir := args[0], args[1], args[2]
	for _, addr := range []string{"127.0.0.1:80", "[::1]:80"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "origin %s host=%s\n", addr, r.Host)
		}))
	}
	sq, err := spawn(spawnRequest{Argv: []string{squid, "-N", "-f", filepath.Join(dir, "squid.conf")}, Ready: "127.0.0.1:3141"})
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
		return fmt.Errorf("%v\n%s", err, log)
	}
	defer sq.Process.Kill() // spawn's goroutine reaps it
	cgdir, err := os.Open(clientCg)
	if err != nil {
		return err
	}
	defer cgdir.Close()
	var res squidResult
	for _, c := range []struct {
		url string
		out *string
	}{{"http://127.0.0.1:80/v4", &res.V4}, {"http://[::1]:80/v6", &res.V6}} {
		cmd := exec.Command("curl", "-sS", "-i", "-g", "--max-time", "15", "-H", "Host: forged.invalid", c.url)
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgdir.Fd()), Pdeathsig: syscall.SIGKILL}
		out, err := cmd.CombinedOutput()
		*c.out = string(out)
		if err != nil {
			*c.out += "curl: " + err.Error()
		}
	}
	// Squid logs a transaction after it has answered it, so curl can be
	// done before its line is written: wait (bounded) for both lines.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		log, _ := os.ReadFile(filepath.Join(dir, "access.log"))
		res.AccessLog = string(log)
		if strings.Count(res.AccessLog, "ORIGINAL_DST/") >= 2 || time.Now().After(deadline) {
			break
		}
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// TestE2EKernelSquidIntercept: an unmodified transparent proxy written for
// iptables REDIRECT (Debian's squid in intercept mode) behind fwpd's
// kernel redirect, running outside the clients' cgroup (in a cgroup of
// its own, named with --proxy-cgroup): its getsockopt(SO_ORIGINAL_DST)
// must be answered, and a forged Host header that resolves to nothing
// still reaches the destination the client connected to — only
// SO_ORIGINAL_DST can route it. IPv4 and IPv6.
func TestE2EKernelSquidIntercept(t *testing.T) {
	testutil.RequireRoot(t)
	squid, err := exec.LookPath("squid")
	if err != nil {
		if squid, err = exec.LookPath("/usr/sbin/squid"); err != nil {
			testutil.Unavailable(t, fmt.Errorf("squid is not installed (apt-get install squid): %w", err))
		}
	}
	if _, err := exec.LookPath("curl"); err != nil {
		testutil.Unavailable(t, err)
	}
	pu, err := user.Lookup("proxy") // squid's cache_effective_user, from Debian's package
	if err != nil {
		testutil.Unavailable(t, fmt.Errorf("squid's user: %w", err))
	}
	uid, _ := strconv.Atoi(pu.Uid)
	gid, _ := strconv.Atoi(pu.Gid)
	clients, squidCg := testutil.NewCgroup(t), testutil.NewCgroup(t)
	sqdir, err := os.MkdirTemp("", "fwpsquid")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sqdir) })
	if err := os.WriteFile(filepath.Join(sqdir, "squid.conf"), []byte(squidConf(sqdir)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sqdir, uid, gid); err != nil {
		t.Fatal(err)
	}
	dir := kernelDir(t)
	d := startKernelDaemon(t, clients, dir, "--proxy-cgroup", squidCg.Path)
	d.mustCtl("apply", "-f", write(t, dir, "squid.yaml", squidPolicy))
	out, err := testutil.RunHelperFiles(squidCg, "squidscenario", nil, nil, clients.Path, squid, sqdir)
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(sqdir, "cache.log"))
		t.Fatalf("%v\nsquid's cache.log:\n%s", err, log)
	}
	var res squidResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, c := range []struct{ name, got, origin string }{{"v4", res.V4, "127.0.0.1:80"}, {"v6", res.V6, "[::1]:80"}} {
		// Through squid (its Via header), to the original destination,
		// with the forged Host header as the client sent it.
		if !strings.Contains(c.got, "origin "+c.origin+" host=forged.invalid") || !strings.Contains(strings.ToLower(c.got), "via: 1.1") {
			t.Errorf("%s: curl got\n%s\nwant the origin at %s's answer relayed by squid", c.name, c.got, c.origin)
		}
	}
	if !strings.Contains(res.AccessLog, "ORIGINAL_DST/127.0.0.1") || !strings.Contains(res.AccessLog, "ORIGINAL_DST/::1") {
		t.Errorf("squid's access log does not show both requests sent to their original destination:\n%s", res.AccessLog)
	}
}
