//go:build linux

// (Named to sort before kernel_e2e_test.go, whose init runs the helpers:
// these must be registered first.)

package main_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cebpf "github.com/cilium/ebpf"

	"fwp/datapath/linux/ebpf"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

func init() {
	testutil.RegisterHelper("rrecho", rrEchoHelper)
	testutil.RegisterHelper("rrbench", rrBenchHelper)
}

// rrSize is the request and the response of each connection.
const rrSize = 64

// rrEchoHelper answers each connection on each address in args with the
// rrSize bytes it read, then closes it.
func rrEchoHelper(args []string) error {
	for _, a := range args {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					var b [rrSize]byte
					if _, err := io.ReadFull(c, b[:]); err == nil {
						c.Write(b[:])
					}
				}()
			}
		}()
	}
	select {}
}

type rrSpawn struct {
	spawnRequest
	UID int `json:"uid"`
}

// rrBenchHelper is the client of the request/response benchmark, in the
// hooked cgroup and a fresh network namespace. Lines:
//
//	spawn {json}        start a process (as uid), wait for Ready; answers its pid
//	iptables args...    run iptables in this namespace
//	rr ADDR N           N connections, one after the other: connect, send
//	                    rrSize bytes, read rrSize bytes, close; answers ns
func rrBenchHelper([]string) error {
	var procs []*exec.Cmd
	defer func() {
		for _, c := range procs {
			c.Process.Kill()
			c.Wait()
		}
	}()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		var answer string
		switch cmd {
		case "spawn":
			var req rrSpawn
			if err := json.Unmarshal([]byte(arg), &req); err != nil {
				return err
			}
			c := exec.Command(req.Argv[0], req.Argv[1:]...)
			c.Env = append(os.Environ(), req.Env...)
			c.Stdout, c.Stderr = os.Stderr, os.Stderr
			c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if req.UID != 0 {
				c.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(req.UID), Gid: uint32(req.UID)}
			}
			if err := c.Start(); err != nil {
				return err
			}
			procs = append(procs, c)
			for i := 0; ; i++ {
				if conn, err := net.Dial("tcp", req.Ready); err == nil {
					conn.Close()
					break
				}
				if i > 1000 {
					return fmt.Errorf("%v never accepted on %s", req.Argv, req.Ready)
				}
				time.Sleep(10 * time.Millisecond)
			}
			answer = strconv.Itoa(c.Process.Pid)
		case "iptables":
			out, err := exec.Command("iptables", strings.Fields(arg)...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("iptables %s: %v: %s", arg, err, out)
			}
			answer = "ok"
		case "rr":
			addr, ns, _ := strings.Cut(arg, " ")
			n, _ := strconv.Atoi(ns)
			start := time.Now()
			var req, resp [rrSize]byte
			for i := range n {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					return fmt.Errorf("rr %s #%d: %w", addr, i, err)
				}
				if _, err := c.Write(req[:]); err != nil {
					return fmt.Errorf("rr %s #%d: %w", addr, i, err)
				}
				if _, err := io.ReadFull(c, resp[:]); err != nil {
					return fmt.Errorf("rr %s #%d: %w", addr, i, err)
				}
				c.Close()
			}
			answer = strconv.FormatInt(int64(time.Since(start)), 10)
		default:
			return fmt.Errorf("unknown request %q", cmd)
		}
		fmt.Println(answer)
	}
	return in.Err()
}

// rrPolicy redirects two origin ports to two proxies, each its redirect's
// target, and a third to the plain relay.
func rrPolicy(sockoptPID, fwpdPID string) string {
	return fmt.Sprintf(`providers:
  - {key: rr, name: RR}
provider_contexts:
  - {key: to-sockopt, provider: rr, data: '{"proxy":"127.0.0.1:3131","target_pid":%s}'}
  - {key: to-plain, provider: rr, data: '{"proxy":"127.0.0.1:3132"}'}
  - {key: to-fwpd, provider: rr, data: '{"proxy":"127.0.0.1:3134","target_pid":%s}'}
callouts:
  - {key: fwp.builtin.connect_redirect/rr, provider: rr, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - {key: rr-sockopt, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/rr, provider_context: to-sockopt, conditions: [{field: ip_remote_port, match: equal, value: 7081}]}
  - {key: rr-plain, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/rr, provider_context: to-plain, conditions: [{field: ip_remote_port, match: equal, value: 7085}]}
  - {key: rr-fwpd, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/rr, provider_context: to-fwpd, conditions: [{field: ip_remote_port, match: equal, value: 7084}]}
`, sockoptPID, fwpdPID)
}

// BenchmarkE2EKernelProxyRR: a 64-byte request and response on a new
// connection each, through the same relay (examples/redirectproxy, a
// process of its own) reached five ways, alternating in one run and one
// network namespace:
//
//	direct      the origin itself (:7082)
//	plain       the relay with -to, no fwp (:3132 -> :7082)
//	fwp         fwp's kernel redirect (:7081 -> :3131), the proxy asking the
//	            socket options and setting the records with setsockopt
//	fwpd        the same redirect (:7084 -> :3134) with -sockopt=false: the
//	            proxy asks fwpd and sets the records through fwpd's socket
//	iptables    iptables REDIRECT in the namespace (:7083 -> :3133), the
//	            relay with -original-dst (SO_ORIGINAL_DST), as nobody so its
//	            own connections are not redirected (-m owner)
//	redirplain  fwp's redirect (:7085) to the plain relay (:3132), which asks
//	            nothing: the redirect's own cost, without the proxy API
//
// Targets (issue 11): fwp ≤ 1.10× plain and ≤ iptables.
func BenchmarkE2EKernelProxyRR(b *testing.B) {
	testutil.RequireRoot(b)
	if _, err := exec.LookPath("iptables"); err != nil {
		testutil.Unavailable(b, fmt.Errorf("the iptables arm needs iptables (apt-get install iptables): %w", err))
	}
	cg := testutil.NewCgroup(b)
	dir, err := os.MkdirTemp("", "fwpbench")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	defer unix.Unmount(filepath.Join(dir, "bpf"))
	pins := filepath.Join(dir, "bpf", "fwp")
	sock := filepath.Join(dir, "fwpd.sock")
	cmd := exec.Command(bins.fwpd, "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--datapath", "kernel", "--cgroup", cg.Path, "--bpffs-dir", pins, "--proxy-cgroup", "none")
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 1000 {
			b.Fatal("fwpd did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	h := testutil.StartHelper(b, cg, "rrbench")
	call := func(line string) string {
		out, err := h.Call([]byte(line))
		if err != nil {
			b.Fatal(err)
		}
		return strings.TrimSpace(string(out))
	}
	spawn := func(uid int, ready string, env []string, argv ...string) string {
		j, _ := json.Marshal(rrSpawn{spawnRequest{Argv: argv, Env: env, Ready: ready}, uid})
		return call("spawn " + string(j))
	}
	originPID := spawn(0, "127.0.0.1:7082", testutil.HelperEnv("rrecho"), os.Args[0], "127.0.0.1:7081", "127.0.0.1:7082", "127.0.0.1:7083", "127.0.0.1:7084")
	sockoptPID := spawn(0, "127.0.0.1:3131", nil, bins.redirectproxy, "-listen", "127.0.0.1:3131", "-socket", sock)
	fwpdPID := spawn(0, "127.0.0.1:3134", nil, bins.redirectproxy, "-listen", "127.0.0.1:3134", "-socket", sock, "-sockopt=false")
	plainPID := spawn(0, "127.0.0.1:3132", nil, bins.redirectproxy, "-listen", "127.0.0.1:3132", "-to", "127.0.0.1:7082")
	pubProxy := publicCopy(b, bins.redirectproxy)
	iptablesPID := spawn(65534, "127.0.0.1:3133", nil, pubProxy, "-listen", "127.0.0.1:3133", "-original-dst")
	// Whose CPU an arm costs (with -v): the client (the helper), the
	// origin and the arm's relay, each from its threads' schedstat run
	// time; "rest" is the cgroup's remainder (softirq work charged to
	// other tasks of the cgroup, the other relays).
	procs := []struct{ name, pid string }{{"client", strconv.Itoa(h.Pid())}, {"origin", originPID}, {"relay", ""}}
	relayOf := []string{"", plainPID, sockoptPID, fwpdPID, iptablesPID, plainPID}
	procCPU := func(pid string) time.Duration {
		var sum time.Duration
		ents, _ := os.ReadDir("/proc/" + pid + "/task")
		for _, e := range ents {
			b, err := os.ReadFile("/proc/" + pid + "/task/" + e.Name() + "/schedstat")
			if err != nil {
				continue
			}
			ns, _ := strconv.ParseInt(strings.Fields(string(b))[0], 10, 64)
			sum += time.Duration(ns)
		}
		return sum
	}
	call("iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport 7083 -m owner ! --uid-owner 65534 -j REDIRECT --to-ports 3133")
	f := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(f, []byte(rrPolicy(sockoptPID, fwpdPID)), 0o644); err != nil {
		b.Fatal(err)
	}
	ctl := exec.Command(bins.fwpctl, "apply", "-f", f)
	ctl.Env = append(os.Environ(), "FWPD_SOCKET="+sock)
	if out, err := ctl.CombinedOutput(); err != nil {
		b.Fatalf("fwpctl apply: %v: %s", err, out)
	}
	arms := []struct{ name, addr string }{
		{"direct", "127.0.0.1:7082"}, {"plain", "127.0.0.1:3132"}, {"fwp", "127.0.0.1:7081"},
		{"fwpd", "127.0.0.1:7084"}, {"iptables", "127.0.0.1:7083"}, {"redirplain", "127.0.0.1:7085"},
	}
	// Short rounds, in rotating order: the load of a shared machine drifts
	// within seconds, and each round compares arms measured together.
	const perArm = 50
	total := make([]time.Duration, len(arms))
	var fwpPlain, fwpIptables, fwpdPlain []float64 // per round
	// fwpd's own CPU time per arm: what the redirect's net events (and,
	// for the fwpd arm, the proxy's queries) cost it.
	fwpdCPU := func() time.Duration {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
		if err != nil {
			return 0
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ 100
	}
	daemonCPU := make([]time.Duration, len(arms))
	// The CPU time of everything in the benchmark's cgroup (client,
	// proxies, origin, and the softirq work done in their context): the
	// cost of a connection, which the machine's load does not inflate
	// the way it does wall time.
	cgroupCPU := func() time.Duration {
		b, err := os.ReadFile(filepath.Join(cg.Path, "cpu.stat"))
		if err != nil {
			return 0
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
				us, _ := strconv.ParseInt(v, 10, 64)
				return time.Duration(us) * time.Microsecond
			}
		}
		return 0
	}
	cpu := make([]time.Duration, len(arms))
	// The hooks' own run time (bpf_stats, read from fwpd's program file
	// descriptors' fdinfo): what fwp's kernel side costs each arm.
	stats, err := ebpf.EnableStats()
	if err != nil {
		testutil.Unavailable(b, err)
	}
	defer stats.Close()
	progTimes := func() map[string]time.Duration {
		out := map[string]time.Duration{}
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", cmd.Process.Pid))
		for _, e := range ents {
			info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", cmd.Process.Pid, e.Name()))
			if err != nil || !bytes.Contains(info, []byte("prog_tag")) {
				continue
			}
			var id string
			var ns int64
			for _, line := range strings.Split(string(info), "\n") {
				if v, ok := strings.CutPrefix(line, "run_time_ns:"); ok {
					ns, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				}
				if v, ok := strings.CutPrefix(line, "prog_id:"); ok {
					id = strings.TrimSpace(v)
				}
			}
			out[id] += time.Duration(ns) // a program held by two fds counts once per fd: deltas only
		}
		return out
	}
	hookTime := func() time.Duration {
		var sum time.Duration
		for _, d := range progTimes() {
			sum += d
		}
		return sum
	}
	hooks := make([]time.Duration, len(arms))
	procTime := make([][3]time.Duration, len(arms))
	perProg := make([]map[string]time.Duration, len(arms))
	for k := range perProg {
		perProg[k] = map[string]time.Duration{}
	}
	for _, a := range arms { // warm up: first connections, page faults, the proxies' goroutines
		call(fmt.Sprintf("rr %s %d", a.addr, 20))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		round := make([]time.Duration, len(arms))
		// Rotate the order so no arm always runs first.
		for j := range arms {
			k := (i + j) % len(arms)
			p0 := progTimes()
			var pt0 [3]time.Duration
			for x, p := range procs {
				if p.pid == "" {
					p.pid = relayOf[k]
				}
				if p.pid != "" {
					pt0[x] = procCPU(p.pid)
				}
			}
			c0, g0, h0 := fwpdCPU(), cgroupCPU(), hookTime()
			ns, err := strconv.ParseInt(call(fmt.Sprintf("rr %s %d", arms[k].addr, perArm)), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			total[k] += time.Duration(ns)
			round[k] = time.Duration(ns)
			daemonCPU[k] += fwpdCPU() - c0
			cpu[k] += cgroupCPU() - g0
			hooks[k] += hookTime() - h0
			for x, p := range procs {
				if p.pid == "" {
					p.pid = relayOf[k]
				}
				if p.pid != "" {
					procTime[k][x] += procCPU(p.pid) - pt0[x]
				}
			}
			for id, d := range progTimes() {
				perProg[k][id] += d - p0[id]
			}
		}
		fwpPlain = append(fwpPlain, float64(round[2])/float64(round[1]))
		fwpIptables = append(fwpIptables, float64(round[2])/float64(round[4]))
		fwpdPlain = append(fwpdPlain, float64(round[3])/float64(round[1]))
		i++
	}
	median := func(v []float64) float64 {
		slices.Sort(v)
		return v[len(v)/2]
	}
	// CPU per connection: the cgroup's and fwpd's.
	cpuPer := func(k int) float64 { return (cpu[k] + daemonCPU[k]).Seconds() * 1e6 / float64(b.N*perArm) }
	for k, a := range arms {
		b.ReportMetric(cpuPer(k), a.name+"-cpuµs/conn")
	}
	for k, a := range arms {
		b.ReportMetric(hooks[k].Seconds()*1e6/float64(b.N*perArm), a.name+"-hooksµs/conn")
	}
	// Which hooks make the difference, with -v.
	for _, k := range []int{1, 2} {
		var parts []string
		for id, d := range perProg[k] {
			name := id
			if n, err := strconv.ParseUint(id, 10, 32); err == nil {
				if p, err := ebpfProgName(uint32(n)); err == nil {
					name = p
				}
			}
			parts = append(parts, fmt.Sprintf("%s %.2f", name, d.Seconds()*1e6/float64(b.N*perArm)))
		}
		slices.Sort(parts)
		b.Logf("%s hooks, µs per connection: %s", arms[k].name, strings.Join(parts, ", "))
	}
	for k, a := range arms {
		us := func(d time.Duration) float64 { return d.Seconds() * 1e6 / float64(b.N*perArm) }
		rest := cpu[k] - procTime[k][0] - procTime[k][1] - procTime[k][2]
		b.Logf("%s CPU µs per connection: client %.1f, origin %.1f, relay %.1f, rest of cgroup %.1f, fwpd %.1f",
			a.name, us(procTime[k][0]), us(procTime[k][1]), us(procTime[k][2]), us(rest), us(daemonCPU[k]))
	}
	b.ReportMetric(cpuPer(2)/cpuPer(1), "fwp/plain-cpu")
	b.ReportMetric(cpuPer(2)/cpuPer(4), "fwp/iptables-cpu")
	b.ReportMetric(median(fwpPlain), "fwp/plain-median")
	b.ReportMetric(median(fwpIptables), "fwp/iptables-median")
	b.ReportMetric(median(fwpdPlain), "fwpd/plain-median")
	per := func(k int) float64 { return total[k].Seconds() * 1e6 / float64(b.N*perArm) }
	for k, a := range arms {
		b.ReportMetric(per(k), a.name+"-µs/conn")
	}
	b.ReportMetric(daemonCPU[2].Seconds()*1e6/float64(b.N*perArm), "fwp-fwpdcpu-µs/conn")
	b.ReportMetric(daemonCPU[3].Seconds()*1e6/float64(b.N*perArm), "fwpd-fwpdcpu-µs/conn")
	b.ReportMetric(per(2)/per(1), "fwp/plain")
	b.ReportMetric(per(2)/per(4), "fwp/iptables")
	b.ReportMetric(per(3)/per(1), "fwpd/plain")
	b.ReportMetric(0, "ns/op")
}

// ebpfProgName names a loaded program by its ID.
func ebpfProgName(id uint32) (string, error) {
	p, err := cebpf.NewProgramFromID(cebpf.ProgramID(id))
	if err != nil {
		return "", err
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return "", err
	}
	return info.Name, nil
}
