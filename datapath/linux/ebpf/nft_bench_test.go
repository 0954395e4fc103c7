//go:build linux

package ebpf

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("connectnft", connectNftHelper) }

// connectNftHelper loads the nftables ruleset file args[0] in its own
// network namespace (a table with a set and an output chain) and measures
// TCP connect+close on loopback alternately without and with the rule
// "ip daddr @bl drop" in the output chain, in short rounds, as
// connectpair does for the hooks. It prints the ns per connect of each.
func connectNftHelper(args []string) error {
	if out, err := exec.Command("nft", "-f", args[0]).CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f: %v: %s", err, out)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	rule := func(on bool) error {
		cmd := []string{"flush", "chain", "ip", "fwpbench", "out"}
		if on {
			cmd = []string{"add", "rule", "ip", "fwpbench", "out", "ip", "daddr", "@bl", "drop"}
		}
		if out, err := exec.Command("nft", cmd...).CombinedOutput(); err != nil {
			return fmt.Errorf("nft %v: %v: %s", cmd, err, out)
		}
		return nil
	}
	var ns [2]int64
	const rounds, perRound = 20, 1000
	for r := range rounds {
		for i := range 2 {
			side := (r + i) % 2 // each side goes first in half the rounds
			if err := rule(side == 1); err != nil {
				return err
			}
			start := time.Now()
			for range perRound {
				c, err := net.Dial("tcp4", l.Addr().String())
				if err != nil {
					return err
				}
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}
			ns[side] += time.Since(start).Nanoseconds()
		}
	}
	return json.NewEncoder(os.Stdout).Encode([2]int64{ns[0] / (rounds * perRound), ns[1] / (rounds * perRound)})
}

// BenchmarkNftConnect is the nftables side of BenchmarkKernelConnect's
// blocklist arm: the same 1M addresses (blocklistPolicy's) in an nftables
// set matched by a drop rule on output, in a test network namespace only;
// connect+close with the rule vs without, alternated in one run.
func BenchmarkNftConnect(b *testing.B) {
	testutil.RequireRoot(b)
	if _, err := exec.LookPath("nft"); err != nil {
		testutil.Unavailable(b, fmt.Errorf("nft: %w (apt-get install nftables)", err))
	}
	cg := testutil.NewCgroup(b)
	var rs bytes.Buffer
	rs.WriteString("add table ip fwpbench\nadd set ip fwpbench bl { type ipv4_addr; size 2000000; }\nadd chain ip fwpbench out { type filter hook output priority 0; }\n")
	const n, per = 1_000_000, 10_000
	for i := 0; i < n; i += per {
		rs.WriteString("add element ip fwpbench bl { ")
		for j := i; j < i+per; j++ {
			if j > i {
				rs.WriteString(", ")
			}
			rs.WriteString(listAddr(j).String())
		}
		rs.WriteString(" }\n")
	}
	file := filepath.Join(b.TempDir(), "ruleset.nft")
	if err := os.WriteFile(file, rs.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
	var bare, rule int64
	runs := 0
	for b.Loop() {
		var ns [2]int64
		if err := json.Unmarshal(testutil.RunHelper(b, cg, "connectnft", nil, file), &ns); err != nil {
			b.Fatal(err)
		}
		bare += ns[0]
		rule += ns[1]
		runs++
	}
	b.ReportMetric(float64(bare)/float64(runs), "ns/connect-norule")
	b.ReportMetric(float64(rule)/float64(runs), "ns/connect-nftset")
	b.ReportMetric(float64(rule)/float64(bare), "ratio")
}
