package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"fwp/api"
	"fwp/engine"
	"fwp/internal/peercred"
	"fwp/internal/testutil"
	"fwp/mgmt"
	"fwp/proxy"
)

// accessHelperEnv makes the test binary, run as another user, call every
// RPC on the socket its argument names and print what each answered.
const accessHelperEnv = "FWP_SERVER_ACCESS_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(accessHelperEnv) != "" {
		res, err := callEveryRPC(os.Args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		json.NewEncoder(os.Stdout).Encode(res)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// pidRedirects answers a query for local address 10.a.b.c with a redirect
// whose target is pid a<<16|b<<8|c, so a helper can ask about a redirect
// of its own (10.<its pid>) and one of pid 1's.
type pidRedirects struct{}

func (pidRedirects) QueryProxyRedirect(local, remote netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	a := local.Addr().As4()
	return proxy.Redirect{Records: []byte("records"), Context: []byte("redirect-secret"), TargetPID: uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])},
		netip.MustParseAddrPort("192.0.2.1:80"), nil
}

const secretData = "provider-context-secret"

// callEveryRPC is the helper: it calls each RPC of the API once, in an
// order in which an allowed call succeeds, and reports "ok", "denied" or
// the unexpected error; for reads it also reports how the provider
// context's data came back.
func callEveryRPC(sock string) (map[string]string, error) {
	cc, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	c := api.NewManagementClient(cc)
	res := map[string]string{}
	verdict := func(err error) string {
		err = api.FromStatus(err)
		switch {
		case err == nil:
			return "ok"
		case errors.Is(err, mgmt.ErrAccessDenied), errors.Is(err, proxy.ErrAccessDenied):
			return "denied"
		}
		return "error: " + err.Error()
	}
	bg, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx := bg
	st, err := c.OpenSession(bg, &api.OpenSessionRequest{Name: "access"})
	if err == nil {
		var s *api.Session
		if s, err = st.Recv(); err == nil {
			ctx = metadata.AppendToOutgoingContext(bg, SessionHeader, strconv.FormatUint(s.GetId(), 10))
		}
	}
	res["OpenSession"] = verdict(err)
	_, err = c.Sessions(ctx, &api.Empty{})
	res["Sessions"] = verdict(err)
	data := func(o *api.ProviderContext) string {
		if o.GetDataRedacted() {
			return fmt.Sprintf("redacted %d %x", o.GetDataLength(), o.GetDataSha256())
		}
		return "data " + string(o.GetData())
	}
	l, err := c.List(ctx, &api.ListRequest{Kind: "provider_context"})
	res["List"] = verdict(err)
	for _, o := range l.GetObjects() {
		res["List.data"] = data(o.GetProviderContext())
	}
	o, err := c.Get(ctx, &api.ObjectRef{Kind: "provider_context", Key: "secret"})
	res["Get"] = verdict(err)
	if err == nil {
		res["Get.data"] = data(o.GetProviderContext())
	}
	_, err = c.Explain(ctx, &api.ExplainRequest{Layer: "ALE_AUTH_CONNECT_V4", Values: map[string]string{"ip_remote_port": "23"}})
	res["Explain"] = verdict(err)
	_, err = c.Version(ctx, &api.Empty{})
	res["Version"] = verdict(err)
	evs, err := c.NetEvents(ctx, &api.NetEventsRequest{})
	n := 0
	for err == nil {
		if _, err = evs.Recv(); err == nil {
			n++
		}
	}
	if err == io.EOF {
		err = nil
		res["NetEvents.n"] = strconv.Itoa(n)
	}
	res["NetEvents"] = verdict(err)
	sctx, scancel := context.WithCancel(ctx)
	sub, err := c.Subscribe(sctx, &api.SubscribeRequest{})
	if err == nil {
		var md metadata.MD
		if md, err = sub.Header(); err == nil && md == nil {
			_, err = sub.Recv()
		}
	}
	scancel()
	res["Subscribe"] = verdict(err)
	_, err = c.Begin(ctx, &api.Empty{})
	res["Begin"] = verdict(err)
	_, err = c.Abort(ctx, &api.Empty{})
	res["Abort"] = verdict(err)
	c.Begin(ctx, &api.Empty{})
	_, err = c.Commit(ctx, &api.Empty{})
	res["Commit"] = verdict(err)
	key := "p" + strconv.Itoa(os.Getpid())
	_, err = c.Apply(ctx, &api.ApplyRequest{Ops: []*api.Op{{Op: &api.Op_Add{Add: &api.Object{Kind: &api.Object_Provider{Provider: &api.Provider{Key: key}}}}}}})
	res["Apply.add"] = verdict(err)
	_, err = c.Apply(ctx, &api.ApplyRequest{Ops: []*api.Op{{Op: &api.Op_Delete{Delete: &api.ObjectRef{Kind: "provider", Key: key}}}}})
	res["Apply.delete"] = verdict(err)
	_, err = c.Apply(ctx, &api.ApplyRequest{Policy: []byte("providers: [{key: " + key + "}]")})
	res["Apply.policy"] = verdict(err)
	pid := os.Getpid()
	own := fmt.Sprintf("10.%d.%d.%d:3128", pid>>16&255, pid>>8&255, pid&255)
	r, err := c.QueryRedirect(ctx, &api.QueryRedirectRequest{Local: own, Remote: "127.0.0.1:40000"})
	res["QueryRedirect.own"] = verdict(err)
	if err == nil && string(r.GetContext()) != "redirect-secret" {
		res["QueryRedirect.own"] = "wrong context " + string(r.GetContext())
	}
	r, err = c.QueryRedirect(ctx, &api.QueryRedirectRequest{Local: "10.0.0.1:3128", Remote: "127.0.0.1:40000"})
	res["QueryRedirect.other"] = verdict(err)
	if err == nil && string(r.GetContext()) != "redirect-secret" {
		res["QueryRedirect.other"] = "wrong context " + string(r.GetContext())
	}
	_, err = c.CloseSession(ctx, &api.Empty{})
	res["CloseSession"] = verdict(err)
	return res, nil
}

// TestAccessMatrix calls every RPC as root, as a member of the admin
// group, as a member of the reader group and as a user with neither,
// each a real process of a real user (useradd, setpriv) whose credentials
// the server reads from the socket (SO_PEERCRED, SO_PEERGROUPS). The
// matrix is the access model of docs/security.md.
func TestAccessMatrix(t *testing.T) {
	testutil.RequireRoot(t)
	admGroup, admGID := testutil.NewGroup(t)
	rdGroup, rdGID := testutil.NewGroup(t)
	admin := testutil.NewUser(t, admGroup)
	reader := testutil.NewUser(t, rdGroup)
	nobody := testutil.NewUser(t)

	f := start(t, Config{AdminGIDs: []uint32{admGID}, ReaderGIDs: []uint32{rdGID}, Redirects: pidRedirects{}})
	// As fwpd serves it: anyone may connect, the rights are per call.
	dir := filepath.Dir(f.sock)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(f.sock, 0o666); err != nil {
		t.Fatal(err)
	}
	sid := f.m.OpenSession(mgmt.SessionInfo{Name: "setup", PID: 1}).ID
	if _, err := f.m.Apply(context.Background(), sid, []mgmt.Op{
		{Add: &mgmt.Object{Provider: &mgmt.Provider{Key: "acme"}}},
		{Add: &mgmt.Object{ProviderContext: &mgmt.ProviderContext{Key: "secret", Provider: "acme", Data: []byte(secretData)}}},
	}); err != nil {
		t.Fatal(err)
	}
	f.m.Engine().RecordNetEvent(engine.NetEvent{Type: engine.EventClassifyDrop, Layer: engine.LayerALEAuthConnectV4, AppID: "/usr/bin/secret-app"})

	// The test binary's directory is private: run a copy.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}

	sum := sha256.Sum256([]byte(secretData))
	redacted := fmt.Sprintf("redacted %d %s", len(secretData), hex.EncodeToString(sum[:]))
	all := map[string]string{"OpenSession": "ok", "Sessions": "ok", "List": "ok", "List.data": "data " + secretData,
		"Get": "ok", "Get.data": "data " + secretData, "Explain": "ok", "NetEvents": "ok", "NetEvents.n": "1", "Subscribe": "ok",
		"Begin": "ok", "Abort": "ok", "Commit": "ok", "Apply.add": "ok", "Apply.delete": "ok", "Apply.policy": "ok",
		"QueryRedirect.own": "ok", "QueryRedirect.other": "ok", "CloseSession": "ok", "Version": "ok"}
	with := func(base map[string]string, kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == "" {
				delete(m, kv[i])
			} else {
				m[kv[i]] = kv[i+1]
			}
		}
		return m
	}
	adminWant := with(all, "QueryRedirect.other", "denied") // only root reads others' redirects
	readerWant := with(adminWant, "List.data", redacted, "Get.data", redacted,
		"Begin", "denied", "Abort", "denied", "Commit", "denied", "Apply.add", "denied", "Apply.delete", "denied", "Apply.policy", "denied")
	noneWant := with(readerWant, "Sessions", "denied", "List", "denied", "List.data", "", "Get", "denied", "Get.data", "",
		"Explain", "denied", "NetEvents", "denied", "NetEvents.n", "", "Subscribe", "denied")

	for _, c := range []struct {
		name string
		cmd  *exec.Cmd
		want map[string]string
	}{
		{"root", exec.Command(bin, f.sock), all},
		{"admin-group member", admin.Command(bin, f.sock), adminWant},
		{"reader-group member", reader.Command(bin, f.sock), readerWant},
		{"unprivileged user", nobody.Command(bin, f.sock), noneWant},
	} {
		c.cmd.Env = append(os.Environ(), accessHelperEnv+"=1", "GORACE=atexit_sleep_ms=0")
		var stderr strings.Builder
		c.cmd.Stderr = &stderr
		out, err := c.cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v\n%s", c.name, err, stderr.String())
		}
		var got map[string]string
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("%s: %v: %s", c.name, err, out)
		}
		if !reflect.DeepEqual(got, c.want) {
			for k := range merge(got, c.want) {
				if got[k] != c.want[k] {
					t.Errorf("%s: %s = %q, want %q", c.name, k, got[k], c.want[k])
				}
			}
		}
	}
}

func merge(a, b map[string]string) map[string]bool {
	m := map[string]bool{}
	for k := range a {
		m[k] = true
	}
	for k := range b {
		m[k] = true
	}
	return m
}

// Every RPC of the service has an access rule: a new one is refused to
// everyone until someone decides its right (and this test says so).
func TestEveryMethodHasARule(t *testing.T) {
	svc := api.Management_ServiceDesc.ServiceName
	var n int
	for _, m := range api.Management_ServiceDesc.Methods {
		n++
		if _, ok := methodRights["/"+svc+"/"+m.MethodName]; !ok {
			t.Errorf("%s has no entry in methodRights", m.MethodName)
		}
	}
	for _, st := range api.Management_ServiceDesc.Streams {
		n++
		if _, ok := methodRights["/"+svc+"/"+st.StreamName]; !ok {
			t.Errorf("%s has no entry in methodRights", st.StreamName)
		}
	}
	if n != len(methodRights) {
		t.Errorf("methodRights has %d entries for %d RPCs", len(methodRights), n)
	}
	// An RPC without a rule is refused, to root too.
	s := New(Config{})
	ctx := peerContext(0)
	if err := s.authorize(ctx, "/"+svc+"/NotYetDecided"); !errors.Is(err, mgmt.ErrAccessDenied) {
		t.Errorf("an RPC without a rule: %v", err)
	}
	if err := s.authorize(ctx, api.Management_Apply_FullMethodName); err != nil {
		t.Errorf("root's Apply: %v", err)
	}
}

// peerContext is a call's context as the peercred credentials make it.
func peerContext(uid uint32) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: peercred.AuthInfo{Cred: peercred.Cred{UID: uid, GID: uid, PID: 1}}})
}

// ctxStream is a server stream that has only a context.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c ctxStream) Context() context.Context { return c.ctx }
