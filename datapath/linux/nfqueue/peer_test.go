//go:build linux

package nfqueue

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/nfqpeer"
)

// The peer arms (BenchmarkNewFlowLatency): the same SYNs, permitted by a
// plain kernel filter as the kernel arm's, are queued by a rule of a table
// of their own ("fwppeer", output hook, filter priority) to a queue read
// by an NFQUEUE peer that accepts every packet:
//
//	portPeer        internal/nfqpeer (florianl/go-nfqueue/v2) as a process of its own
//	portPeerInproc  the same loop in this process
//	portPeerRaw     this package's own queue reader (one queue per CPU, fanout,
//	                pinned raw recvfrom loops) with no decision: the floor of fwp's loop
const (
	portPeer       = 8013
	portPeerInproc = 8014
	portPeerRaw    = 8015

	queuePeer       = 7900
	queuePeerInproc = 7901
	queuePeerRaw    = 7910 // .. + CPUs

	peerTable = "fwppeer"
)

func init() { helperPorts = append(helperPorts, portPeer, portPeerInproc, portPeerRaw) }

// peers are the three peers of one fixture.
type peers struct {
	proc    *exec.Cmd
	procIn  io.WriteCloser
	procOut *bufio.Reader
	inproc  *nfqpeer.Peer
	raw     []*queue
	rawWG   sync.WaitGroup
	rawN    [64]uint64 // per queue, written by its loop only
}

// startPeers adds kernel permit filters for the peer ports to the
// fixture's policy, builds and starts the peer program in the helper's
// namespace, starts the other two, and installs the peer table.
func startPeers(tb testing.TB, fx *fixture) *peers {
	tb.Helper()
	err := fx.eng.Update(func(tx *engine.Txn) error {
		for _, port := range []uint16{portPeer, portPeerInproc, portPeerRaw} {
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(port)},
				},
				Action: engine.Action{Type: engine.ActionPermit}}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		tb.Fatal(err)
	}
	if err := fx.dp.Apply(pol); err != nil {
		tb.Fatal(err)
	}
	ps := &peers{}
	bin := buildPeer(tb)
	ps.proc = exec.Command("nsenter", fmt.Sprintf("--net=/proc/%d/ns/net", fx.h.Pid()), "--", bin, "-queue", fmt.Sprint(queuePeer))
	ps.procIn, _ = ps.proc.StdinPipe()
	out, _ := ps.proc.StdoutPipe()
	ps.proc.Stderr = os.Stderr
	if err := ps.proc.Start(); err != nil {
		tb.Fatal(err)
	}
	ps.procOut = bufio.NewReader(out)
	tb.Cleanup(func() { ps.procIn.Close(); ps.proc.Wait() })
	if line, _ := ps.procOut.ReadString('\n'); strings.TrimSpace(line) != "ready" {
		tb.Fatalf("nfqpeer: %q", line)
	}
	if ps.inproc, err = nfqpeer.Start(int(fx.netns.Fd()), queuePeerInproc); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ps.inproc.Close() })
	ncpu := runtime.NumCPU()
	for i := range ncpu {
		q, err := openQueue(int(fx.netns.Fd()), uint16(queuePeerRaw+i), i, 8192)
		if err != nil {
			tb.Fatal(err)
		}
		ps.raw = append(ps.raw, q)
		ps.rawWG.Add(1)
		go ps.rawLoop(q, i)
	}
	tb.Cleanup(func() {
		for _, q := range ps.raw {
			q.close()
		}
		ps.rawWG.Wait()
	})
	if err := installPeerTable(int(fx.netns.Fd()), uint16(ncpu)); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { removePeerTable(int(fx.netns.Fd())) })
	return ps
}

// rawLoop is Path.readLoop without the decision: accept every packet.
func (ps *peers) rawLoop(q *queue, i int) {
	defer ps.rawWG.Done()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old, set unix.CPUSet
	if unix.SchedGetaffinity(0, &old) == nil {
		set.Set(q.cpu)
		if unix.SchedSetaffinity(0, &set) == nil {
			defer unix.SchedSetaffinity(0, &old)
		}
	}
	for !q.closed.Load() {
		q.read(func(pk *packet) {
			if q.verdict(pk.id, verdictAccept, 0, false) == nil {
				ps.rawN[i]++
			}
		})
	}
}

// procAccepted ends the peer program and returns how many packets it
// accepted.
func (ps *peers) procAccepted(tb testing.TB) (accepted, errs uint64) {
	tb.Helper()
	ps.procIn.Close()
	line, _ := ps.procOut.ReadString('\n')
	if _, err := fmt.Sscan(line, &accepted, &errs); err != nil {
		tb.Fatalf("nfqpeer's count: %q", line)
	}
	return accepted, errs
}

var (
	peerBinOnce sync.Once
	peerBin     string
	peerBinErr  error
)

// buildPeer builds cmd/nfqpeer once per test binary run.
func buildPeer(tb testing.TB) string {
	tb.Helper()
	peerBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fwpnfqpeer")
		if err != nil {
			peerBinErr = err
			return
		}
		goBin, err := exec.LookPath("go")
		if err != nil {
			peerBinErr = err
			return
		}
		peerBin = filepath.Join(dir, "nfqpeer")
		out, err := exec.Command(goBin, "build", "-o", peerBin, "fwp/internal/nfqpeer/cmd/nfqpeer").CombinedOutput()
		if err != nil {
			peerBinErr = fmt.Errorf("go build nfqpeer: %v: %s", err, out)
		}
	})
	if peerBinErr != nil {
		tb.Fatal(peerBinErr)
	}
	return peerBin
}

// installPeerTable queues the peer ports' SYNs to their peers: no bypass,
// so a peer that is not reading shows as failed connects, never as the
// kernel arm's figure.
func installPeerTable(netns int, ncpu uint16) error {
	c, err := conn(netns)
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: peerTable})
	ch := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter})
	for _, r := range []struct {
		port        uint16
		base, total uint16
	}{{portPeer, queuePeer, 1}, {portPeerInproc, queuePeerInproc, 1}, {portPeerRaw, queuePeerRaw, ncpu}} {
		var p [2]byte
		binary.BigEndian.PutUint16(p[:], r.port)
		exprs := append(synOnly(),
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p[:]},
			nfqueueTarget(r.base, r.total, false))
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: exprs})
	}
	return c.Flush()
}

func removePeerTable(netns int) error {
	c, err := conn(netns)
	if err != nil {
		return err
	}
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: peerTable})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}

// TestPeers: the peers the benchmark compares fwp with really answer the
// SYNs of their ports (each counts them), and their table goes with them.
func TestPeers(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	ps := startPeers(t, fx)
	const n = 20
	for _, port := range []int{portPeer, portPeerInproc, portPeerRaw} {
		if f := fx.call(t, fmt.Sprintf("dial %d %d 1", port, n)); f[0] != fmt.Sprint(n) {
			t.Fatalf("port %d: %v", port, f)
		}
	}
	if got := ps.inproc.Accepted(); got != n {
		t.Errorf("in-process peer accepted %d, want %d", got, n)
	}
	var raw uint64
	for _, q := range ps.raw {
		q.close()
	}
	ps.rawWG.Wait()
	for _, v := range ps.rawN {
		raw += v
	}
	if raw != n {
		t.Errorf("raw peer accepted %d, want %d", raw, n)
	}
	if got, errs := ps.procAccepted(t); got != n || errs != 0 {
		t.Errorf("peer program accepted %d (%d errors), want %d", got, errs, n)
	}
	if st := fx.path.Stats(); st.Queued != 0 {
		t.Errorf("fwp's path read %d packets of the peers' ports", st.Queued)
	}
	if err := removePeerTable(int(fx.netns.Fd())); err != nil {
		t.Fatal(err)
	}
}
