//go:build linux

package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"fwp/fleet"
	"fwp/internal/etcdtest"
	"fwp/internal/testutil"
)

const fleetPrefix = "/fwp/"

func fleetArgs(c *etcdtest.Cluster, name string) []string {
	return []string{"--policy-source", "etcd", "--etcd-endpoints", strings.Join(c.Endpoints(), ","), "--etcd-prefix", fleetPrefix,
		"--node-name", name, "--etcd-lease-ttl", "2s", "--node-labels", "fleet=e2e,name=" + name, "--metrics-addr", "127.0.0.1:0"}
}

// fleetCtl runs fwpctl fleet against the cluster.
func fleetCtl(t *testing.T, d *daemon, c *etcdtest.Cluster, args ...string) (string, string, int) {
	return d.ctl(append(append([]string{"fleet"}, args...), "--etcd-endpoints", strings.Join(c.Endpoints(), ","), "--etcd-prefix", fleetPrefix)...)
}

func nodesByName(t *testing.T, cl *clientv3.Client) map[string]fleet.Status {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ns, _, err := fleet.Nodes(ctx, cl, fleetPrefix)
	if err != nil {
		return nil
	}
	out := map[string]fleet.Status{}
	for _, s := range ns {
		out[s.Node] = s
	}
	return out
}

func waitNodes(t *testing.T, cl *clientv3.Client, d time.Duration, what string, ok func(map[string]fleet.Status) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ns := nodesByName(t, cl)
		if ns != nil && ok(ns) {
			return time.Since(start)
		}
		if time.Since(start) > d {
			t.Fatalf("after %s: %s; nodes: %+v", d, what, ns)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func allAt(names []string, rev int64) func(map[string]fleet.Status) bool {
	return func(ns map[string]fleet.Status) bool {
		for _, n := range names {
			if ns[n].Revision < rev {
				return false
			}
		}
		return true
	}
}

// TestE2EFleet: a 3-member etcd cluster, three fwpd following it (two
// without a datapath, one with the kernel datapath on a child cgroup), the
// policy written with the real fwpctl.
func TestE2EFleet(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	c := etcdtest.Start(t, 3)
	cl := c.Client(t)
	cg := testutil.NewCgroup(t)
	kdir := kernelDir(t)
	k := startKernelDaemon(t, cg, kdir, fleetArgs(c, "k")...)
	s, _ := startScenario(t, cg, k.pins)
	hosts := map[string]*daemon{"k": k.daemon}
	dirs := map[string]string{}
	for _, n := range []string{"a", "b"} {
		dirs[n] = shortDir(t)
		hosts[n] = startDaemon(t, dirs[n], fleetArgs(c, n)...)
	}
	names := []string{"a", "b", "k"}
	waitNodes(t, cl, 10*time.Second, "three hosts report", func(ns map[string]fleet.Status) bool { return len(ns) == 3 })
	if r := s.run(curl("http://127.0.0.3:9090/")...); r.Code != 0 {
		t.Fatalf("before any policy: %+v", r)
	}
	pol := filepath.Join(t.TempDir(), "corp.yaml")
	writeFleetDoc := func(name, body string) string {
		p := filepath.Join(filepath.Dir(pol), name+".yaml")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	apply := func(name, body string) int64 {
		t.Helper()
		out, errs, code := fleetCtl(t, k.daemon, c, "apply", "-f", writeFleetDoc(name, body), "-o", "json")
		if code != 0 {
			t.Fatalf("fwpctl fleet apply %s: exit %d: %s", name, code, errs)
		}
		var r struct{ Revision int64 }
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatal(err)
		}
		return r.Revision
	}
	blocked := func(addr string) bool {
		r := s.run(curl("http://" + addr + ":9090/")...)
		return r.Code == 7
	}

	// A policy written once reaches the three hosts within 1 s, and the
	// kernel enforces it.
	rev := apply("corp", blockHost3)
	took := waitNodes(t, cl, time.Second, "the policy on every host within 1 s", allAt(names, rev))
	t.Logf("revision %d on three hosts after %s", rev, took)
	if !blocked("127.0.0.3") {
		t.Fatal("the kernel host does not enforce the fleet policy")
	}
	// Fleet objects belong to the fleet's provider; a local one is kept apart.
	if errs, code := k.apply(t, "filters:\n  - {key: local-one, lifetime: persistent, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_address, match: equal, value: 127.0.0.5}]}\n"); code != 0 {
		t.Fatal(errs)
	}
	var fs []struct{ Key, Provider string }
	json.Unmarshal([]byte(k.mustCtl("filter", "list", "-o", "json")), &fs)
	if fmt.Sprint(fs) != "[{block-host3 fwp.fleet} {local-one }]" {
		t.Fatalf("filters on the kernel host: %v", fs)
	}

	// fwpctl refuses an invalid document before writing it.
	_, errs, code := fleetCtl(t, k.daemon, c, "apply", "-f", writeFleetDoc("broken", "filters:\n  - {key: x, layer: ALE_AUTH_CONNECT_V4, action: frobnicate}\n"))
	if code == 0 || !strings.Contains(errs, "broken:2") {
		t.Fatalf("fwpctl fleet apply of an invalid document: exit %d, %s", code, errs)
	}
	// One written behind its back is refused by every host, which keeps
	// its policy and reports the error.
	pr, err := cl.Put(context.Background(), fleet.PoliciesPrefix(fleetPrefix)+"broken", "filters:\n  - {key: x, layer: ALE_AUTH_CONNECT_V4, action: frobnicate}\n")
	if err != nil {
		t.Fatal(err)
	}
	waitNodes(t, cl, 2*time.Second, "every host reports the refused revision", func(ns map[string]fleet.Status) bool {
		for _, n := range names {
			if s := ns[n]; s.LastError == nil || s.LastError.Revision != pr.Header.Revision || s.Revision != rev || !strings.Contains(s.LastError.Error, "frobnicate") {
				return false
			}
		}
		return true
	})
	if !blocked("127.0.0.3") {
		t.Fatal("a refused revision undid the policy in force")
	}
	out, _, _ := fleetCtl(t, k.daemon, c, "status")
	if !strings.Contains(out, "invalid document broken") || !strings.Contains(out, fmt.Sprintf("rev %d:", pr.Header.Revision)) {
		t.Errorf("fwpctl fleet status does not show the refusal:\n%s", out)
	}
	if _, err := cl.Delete(context.Background(), fleet.PoliciesPrefix(fleetPrefix)+"broken"); err != nil {
		t.Fatal(err)
	}
	// A document only the kernel datapath refuses (a Go callout), for the
	// kernel host alone: it reports the refusal, the others never see it.
	rev2 := apply("kernel-only", "nodes: {hosts: [k]}\ncallouts:\n  - {key: my-go-callout, layer: ALE_AUTH_CONNECT_V4}\nfilters:\n  - {key: go-callout, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: my-go-callout}\n")
	waitNodes(t, cl, 2*time.Second, "the kernel host reports its datapath's refusal", func(ns map[string]fleet.Status) bool {
		kn := ns["k"]
		return kn.LastError != nil && kn.LastError.Revision == rev2 && strings.Contains(kn.LastError.Error, "kernel datapath") &&
			ns["a"].Revision == rev2 && ns["b"].Revision == rev2
	})
	if !blocked("127.0.0.3") {
		t.Fatal("a refused revision undid the policy in force")
	}
	if _, _, code := fleetCtl(t, k.daemon, c, "delete", "kernel-only"); code != 0 {
		t.Fatal("fwpctl fleet delete failed")
	}

	// Kill one etcd member: writes and sync continue.
	c.Members[1].Kill()
	rev = apply("corp", strings.Replace(blockHost3, "127.0.0.3", "127.0.0.4", 1))
	waitNodes(t, cl, 5*time.Second, "sync with one etcd member down", allAt(names, rev))
	if !blocked("127.0.0.4") || blocked("127.0.0.3") {
		t.Fatal("the kernel host does not enforce the new revision")
	}
	// Stop all of etcd: every host keeps enforcing, and says so.
	for _, m := range c.Members {
		m.Stop()
	}
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(k.metrics(t), "fwp_fleet_connected 0") {
		if time.Now().After(deadline) {
			t.Fatalf("fwpd's metrics do not say etcd is unreachable:\n%s", grepLines(k.metrics(t), "fwp_fleet"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !blocked("127.0.0.4") {
		t.Fatal("the kernel host stopped enforcing while etcd is down")
	}
	for _, n := range []string{"a", "b"} {
		var out string
		for {
			out = hosts[n].mustCtl("fleet", "status", "--local", filepath.Join(dirs[n], "state", "fleet-status.json"), "-o", "json")
			var st fleetStatusOut
			json.Unmarshal([]byte(out), &st)
			if len(st.Nodes) == 1 && !st.Nodes[0].Connected && st.Nodes[0].Revision == rev {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s's local status while etcd is down: %s", n, out)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for _, m := range c.Members {
		c.Restart(m)
	}
	c.WaitHealthy(t, 30*time.Second)
	rev = apply("corp", strings.Replace(blockHost3, "127.0.0.3", "127.0.0.6", 1))
	waitNodes(t, cl, 15*time.Second, "every host catches up when etcd returns", allAt(names, rev))
	if !blocked("127.0.0.6") || blocked("127.0.0.4") {
		t.Fatal("the kernel host did not catch up")
	}

	// Restart a fwpd: it resumes from its store, applying nothing again.
	a := hosts["a"]
	a.stop(15) // SIGTERM
	a2 := startDaemon(t, dirs["a"], fleetArgs(c, "a")...)
	waitNodes(t, cl, 5*time.Second, "the restarted host reports", func(ns map[string]fleet.Status) bool { return ns["a"].Revision == rev })
	time.Sleep(300 * time.Millisecond)
	if st := nodesByName(t, cl)["a"]; st.Commits != 0 || strings.Contains(a2.log.String(), "fleet policy applied") {
		t.Fatalf("the restarted host applied again what it had: commits %d\n%s", st.Commits, a2.log)
	}
	rev = apply("more", "filters:\n  - {key: more, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, value: 7}]}\n")
	waitNodes(t, cl, 2*time.Second, "the restarted host follows", allAt(names, rev))
	hosts["a"] = a2

	// Kill a fwpd: its status vanishes when its lease (2 s) ends.
	hosts["b"].stop(9) // SIGKILL
	killed := time.Now()
	waitNodes(t, cl, 10*time.Second, "the killed host vanishes", func(ns map[string]fleet.Status) bool { _, ok := ns["b"]; return !ok && len(ns) == 2 })
	if d := time.Since(killed); d < time.Second {
		t.Errorf("the killed host vanished after %s, before its lease could end", d)
	}
}

type fleetStatusOut struct {
	Nodes []fleet.Status `json:"nodes"`
}
