package calloute2e

import (
	"bufio"
	"context"
	"io"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/mgmt"
)

// startExample starts an example program and waits for its "ready" line.
func startExample(t *testing.T, bin string, args ...string) (*exec.Cmd, chan string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	errb := &syncBuffer{}
	cmd.Stderr = errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 256)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	waitLine(t, lines, "ready", errb)
	return cmd, lines
}

func waitLine(t *testing.T, lines chan string, sub string, errb interface{ String() string }) string {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the program ended before %q: %v", sub, errb)
			}
			if strings.Contains(l, sub) {
				return l
			}
		case <-timeout:
			t.Fatalf("no %q", sub)
		}
	}
}

func appClassify(t *testing.T, d *daemon, layer engine.LayerID, app, remote string, meta *engine.Metadata) client.ClassifyResult {
	t.Helper()
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort(remote))
	vs.Set(engine.FieldALEAppID, engine.String(app))
	if meta == nil {
		meta = &engine.Metadata{}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := d.cl.Classify(ctx, layer, &vs, meta)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestExampleAskUser(t *testing.T) {
	for _, answer := range []string{"allow", "block"} {
		t.Run(answer, func(t *testing.T) {
			d := startDaemon(t)
			_, lines := startExample(t, bins.askuser, "-socket", d.sock, "-auto", answer)
			want := map[string]engine.ActionType{"allow": engine.ActionPermit, "block": engine.ActionBlock}[answer]
			// A new pair: pended, asked, remembered, completed.
			r := appClassify(t, d, engine.LayerALEAuthConnectV4, "/usr/bin/curl", "10.1.1.1:443", nil)
			if r.Action != want {
				t.Fatalf("first connection: %+v", r)
			}
			waitLine(t, lines, "/usr/bin/curl -> 10.1.1.1:443: "+answer, nil)
			key := strings.TrimPrefix(waitLine(t, lines, "remembered as filter", nil), "askuser: remembered as filter ")
			f, err := d.c.Get(context.Background(), mgmt.Ref{Kind: mgmt.KindFilter, Key: key})
			if err != nil || f.Filter.Lifetime != mgmt.LifetimePersistent {
				t.Fatalf("remembered filter %s: %+v %v", key, f.Filter, err)
			}
			// The same pair again: the remembered filter decides, no prompt.
			r = appClassify(t, d, engine.LayerALEAuthConnectV4, "/usr/bin/curl", "10.1.1.1:443", nil)
			if r.Action != want || (r.Reason != engine.ReasonFilterPermit && r.Reason != engine.ReasonFilterBlock) {
				t.Fatalf("second connection: %+v", r)
			}
			if i := d.info("askuser-ALE_AUTH_CONNECT_V4"); i.Pends != 1 {
				t.Fatalf("asked %d times: %+v", i.Pends, i)
			}
			// Another application to the same place is asked about.
			if r := appClassify(t, d, engine.LayerALEAuthConnectV4, "/usr/bin/wget", "10.1.1.1:443", nil); r.Action != want {
				t.Fatalf("another application: %+v", r)
			}
			waitLine(t, lines, "/usr/bin/wget", nil)
			if o := d.outstanding(); o.Pends != 0 || o.ClassifyHandles != 0 {
				t.Fatalf("fwpd holds %+v", o)
			}
		})
	}
}

var _ = io.EOF

func TestExampleAppProxy(t *testing.T) {
	d := startDaemon(t)
	startExample(t, bins.appproxy, "-socket", d.sock, "-route", "/usr/bin/curl=127.0.0.1:3128@4242", "-route", "/usr/bin/wget=127.0.0.1:3129")
	redir := engine.LayerALEConnectRedirectV4
	for app, want := range map[string]string{"/usr/bin/curl": "127.0.0.1:3128", "/usr/bin/wget": "127.0.0.1:3129", "/usr/bin/ssh": ""} {
		r := appClassify(t, d, redir, app, "10.1.1.1:80", nil)
		if want == "" {
			if r.Connect != nil {
				t.Fatalf("%s redirected: %+v", app, r.Connect)
			}
			continue
		}
		c := r.Connect
		if c == nil || c.RemoteAddressAndPort.String() != want || string(c.LocalRedirectContext) != "10.1.1.1:80" {
			t.Fatalf("%s: %+v", app, r)
		}
		if app == "/usr/bin/curl" && c.LocalRedirectTargetPID != 4242 {
			t.Fatalf("target pid %d", c.LocalRedirectTargetPID)
		}
		// The proxy's side: the records it carries name appproxy's handle,
		// and its own connection to the original destination (same
		// application path, as a proxy run by that binary would have)
		// carrying them is not redirected again.
		recs, err := engine.ParseRedirectRecords(r.Records)
		if err != nil || recs.Len() != 1 {
			t.Fatalf("records: %v %v", recs, err)
		}
		if last, _ := recs.Last(); last.Handle != c.LocalRedirectHandle || last.Original.String() != "10.1.1.1:80" {
			t.Fatalf("record %+v", last)
		}
		again := appClassify(t, d, redir, app, "10.1.1.1:80", &engine.Metadata{Present: engine.MetaRedirectRecords, RedirectRecords: recs})
		if again.Connect != nil && again.Connect.RemoteAddressAndPort.String() != "10.1.1.1:80" {
			t.Fatalf("the proxy's connection was redirected again: %+v", again.Connect)
		}
	}
}
