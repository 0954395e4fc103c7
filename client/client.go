package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"fwp/api"
	"fwp/internal/version"
	"fwp/mgmt"
)

// DefaultSocket is where fwpd listens unless told otherwise.
const DefaultSocket = "/run/fwp/fwpd.sock"

// SocketFromEnv returns $FWPD_SOCKET, or DefaultSocket.
func SocketFromEnv() string {
	if s := os.Getenv("FWPD_SOCKET"); s != "" {
		return s
	}
	return DefaultSocket
}

// Options configure a client's session.
type Options struct {
	Name    string // shown by Sessions; default the program's name
	Dynamic bool   // the session's objects are deleted when it ends
	// MaxRecvBytes bounds a response (default 1 GiB: large listings).
	MaxRecvBytes int
}

// Client is a connection to fwpd with one open session. Its methods are
// safe for concurrent use; a transaction belongs to the whole client.
type Client struct {
	conn    *grpc.ClientConn
	rpc     api.ManagementClient
	session mgmt.SessionInfo
	cancel  context.CancelFunc
	done    chan struct{}
	once    sync.Once
	socket  string // for the redirect records side channel
}

// Dial connects to the daemon's unix socket and opens a session.
func Dial(ctx context.Context, socket string, opts Options) (*Client, error) {
	if opts.Name == "" && len(os.Args) > 0 {
		opts.Name = os.Args[0]
	}
	if opts.MaxRecvBytes <= 0 {
		opts.MaxRecvBytes = 1 << 30
	}
	conn, err := grpc.NewClient("unix:"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(opts.MaxRecvBytes), grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", api.ErrUnavailable, err)
	}
	// The session stream lives as long as the client, not as ctx.
	sctx, cancel := context.WithCancel(context.Background())
	c := &Client{conn: conn, rpc: api.NewManagementClient(conn), cancel: cancel, done: make(chan struct{}), socket: socket}
	st, err := c.rpc.OpenSession(sctx, &api.OpenSessionRequest{Name: opts.Name, Dynamic: opts.Dynamic})
	var first *api.Session
	if err == nil {
		got := make(chan struct{})
		go func() {
			defer close(got)
			first, err = st.Recv()
		}()
		select {
		case <-got:
		case <-ctx.Done():
			cancel()
			<-got
			err = ctx.Err()
		}
	}
	if err != nil {
		cancel()
		conn.Close()
		err = api.FromStatus(err)
		if errors.Is(err, api.ErrUnavailable) {
			why, limit := diagnose(socket)
			if limit != nil {
				return nil, fmt.Errorf("fwp: opening a session on %s (%s): %w: %w", socket, why, limit, err)
			}
			return nil, fmt.Errorf("fwp: opening a session on %s (%s): %w", socket, why, err)
		}
		return nil, fmt.Errorf("fwp: opening a session on %s: %w", socket, err)
	}
	c.session = api.ToSession(first)
	go func() {
		defer close(c.done)
		for {
			if _, err := st.Recv(); err != nil {
				return
			}
		}
	}()
	return c, nil
}

// Session describes the client's session.
func (c *Client) Session() mgmt.SessionInfo { return c.session }

// Close closes the session (deleting its dynamic objects, aborting its
// transaction) and the connection.
func (c *Client) Close() error {
	var err error
	c.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err = c.rpc.CloseSession(c.ctx(ctx), &api.Empty{})
		err = api.FromStatus(err)
		c.cancel()
		if cerr := c.conn.Close(); err == nil {
			err = cerr
		}
	})
	return err
}

func (c *Client) ctx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "fwp-session", strconv.FormatUint(c.session.ID, 10))
}

// Begin opens the session's transaction; the following writes are applied
// by Commit, all at once, or dropped by Abort.
func (c *Client) Begin(ctx context.Context) error {
	_, err := c.rpc.Begin(c.ctx(ctx), &api.Empty{})
	return api.FromStatus(err)
}

// Commit commits the session's transaction.
func (c *Client) Commit(ctx context.Context) error {
	_, err := c.rpc.Commit(c.ctx(ctx), &api.Empty{})
	return api.FromStatus(err)
}

// Abort drops the session's transaction.
func (c *Client) Abort(ctx context.Context) error {
	_, err := c.rpc.Abort(c.ctx(ctx), &api.Empty{})
	return api.FromStatus(err)
}

// Apply runs ops as one unit (in the open transaction, or in an implicit
// one).
func (c *Client) Apply(ctx context.Context, ops []mgmt.Op) (mgmt.ApplyResult, error) {
	return c.apply(ctx, &api.ApplyRequest{Ops: api.FromOps(ops)})
}

// ApplyPolicy applies a policy file (see package policy) as one unit; the
// daemon parses it, and errors say name:line.
func (c *Client) ApplyPolicy(ctx context.Context, name string, data []byte) (mgmt.ApplyResult, error) {
	return c.apply(ctx, &api.ApplyRequest{PolicyName: name, Policy: data})
}

// ApplyPolicyFiles is ApplyPolicy with the values files the policy's list
// conditions name (policy.ValuesFileNames), by name: the daemon reads
// nothing from its own file system for a request.
func (c *Client) ApplyPolicyFiles(ctx context.Context, name string, data []byte, valuesFiles map[string][]byte) (mgmt.ApplyResult, error) {
	return c.apply(ctx, &api.ApplyRequest{PolicyName: name, Policy: data, ValuesFiles: valuesFiles})
}

func (c *Client) apply(ctx context.Context, req *api.ApplyRequest) (mgmt.ApplyResult, error) {
	resp, err := c.rpc.Apply(c.ctx(ctx), req)
	if err != nil {
		return mgmt.ApplyResult{}, api.FromStatus(err)
	}
	var res mgmt.ApplyResult
	for _, r := range resp.GetAdded() {
		ref, _ := api.ToRef(r)
		res.Added = append(res.Added, ref)
	}
	for _, r := range resp.GetDeleted() {
		ref, _ := api.ToRef(r)
		res.Deleted = append(res.Deleted, ref)
	}
	res.Warnings = resp.GetWarnings()
	return res, nil
}

// Add adds one object and returns its reference with the engine's ID.
func (c *Client) Add(ctx context.Context, o mgmt.Object) (mgmt.Ref, error) {
	res, err := c.Apply(ctx, []mgmt.Op{{Add: &o}})
	if err != nil {
		return mgmt.Ref{}, err
	}
	return res.Added[0], nil
}

// Delete deletes one object by key (or by ID when the key is empty).
func (c *Client) Delete(ctx context.Context, r mgmt.Ref) error {
	_, err := c.Apply(ctx, []mgmt.Op{{Delete: &r}})
	return err
}

// Get returns one object, as this session sees it.
func (c *Client) Get(ctx context.Context, r mgmt.Ref) (mgmt.Object, error) {
	o, err := c.rpc.Get(c.ctx(ctx), api.FromRef(r))
	if err != nil {
		return mgmt.Object{}, api.FromStatus(err)
	}
	return api.ToObject(o)
}

// List enumerates the objects of a kind that the template selects, sorted
// (filters in evaluation order).
func (c *Client) List(ctx context.Context, kind mgmt.Kind, t mgmt.Template) ([]mgmt.Object, error) {
	resp, err := c.rpc.List(c.ctx(ctx), &api.ListRequest{Kind: kind.String(), Layer: t.Layer, Sublayer: t.Sublayer,
		Provider: t.Provider, Callout: t.Callout, Action: t.Action})
	if err != nil {
		return nil, api.FromStatus(err)
	}
	out := make([]mgmt.Object, 0, len(resp.GetObjects()))
	for _, o := range resp.GetObjects() {
		mo, err := api.ToObject(o)
		if err != nil {
			return nil, err
		}
		out = append(out, mo)
	}
	return out, nil
}

// Filters lists filters.
func (c *Client) Filters(ctx context.Context, t mgmt.Template) ([]mgmt.Filter, error) {
	objs, err := c.List(ctx, mgmt.KindFilter, t)
	if err != nil {
		return nil, err
	}
	out := make([]mgmt.Filter, len(objs))
	for i, o := range objs {
		out[i] = *o.Filter
	}
	return out, nil
}

// Sessions lists the daemon's open sessions.
func (c *Client) Sessions(ctx context.Context) ([]mgmt.SessionInfo, error) {
	resp, err := c.rpc.Sessions(c.ctx(ctx), &api.Empty{})
	if err != nil {
		return nil, api.FromStatus(err)
	}
	var out []mgmt.SessionInfo
	for _, s := range resp.GetSessions() {
		out = append(out, api.ToSession(s))
	}
	return out, nil
}

// Step is one line of an arbitration trace.
type Step struct {
	Sublayer     uint32 `json:"sublayer"`
	SublayerKey  string `json:"sublayer_key"`
	FilterID     uint64 `json:"filter_id"`
	FilterKey    string `json:"filter_key"`
	FilterAction string `json:"filter_action"`
	Callout      uint32 `json:"callout,omitempty"`
	Returned     string `json:"returned"`
	WriteBefore  bool   `json:"write_before"`
	WriteAfter   bool   `json:"write_after"`
	Note         string `json:"note,omitempty"`
}

// Explanation says which filter decides a tuple (the best terminating
// match) and how arbitration got there.
type Explanation struct {
	Layer       string `json:"layer"`
	Values      string `json:"values"`
	Action      string `json:"action"`
	Hard        bool   `json:"hard"`
	FilterID    uint64 `json:"filter_id"`
	FilterKey   string `json:"filter_key,omitempty"`
	Sublayer    uint32 `json:"sublayer,omitempty"`
	SublayerKey string `json:"sublayer_key,omitempty"`
	Callout     uint32 `json:"callout,omitempty"`
	Reason      string `json:"reason"`
	Steps       []Step `json:"steps"`
}

// Explain runs the committed policy's arbitration for a tuple (field name
// → value, e.g. ip_remote_port → 443) without traffic or callouts.
func (c *Client) Explain(ctx context.Context, layer string, values map[string]string) (*Explanation, error) {
	r, err := c.rpc.Explain(c.ctx(ctx), &api.ExplainRequest{Layer: layer, Values: values})
	if err != nil {
		return nil, api.FromStatus(err)
	}
	x := &Explanation{Layer: r.Layer, Values: r.Values, Action: r.Action, Hard: r.Hard, FilterID: r.FilterId,
		FilterKey: r.FilterKey, Sublayer: r.Sublayer, SublayerKey: r.SublayerKey, Callout: r.Callout, Reason: r.Reason,
		Steps: []Step{}}
	for _, s := range r.Steps {
		x.Steps = append(x.Steps, Step{Sublayer: s.Sublayer, SublayerKey: s.SublayerKey, FilterID: s.FilterId,
			FilterKey: s.FilterKey, FilterAction: s.FilterAction, Callout: s.Callout, Returned: s.Returned,
			WriteBefore: s.WriteBefore, WriteAfter: s.WriteAfter, Note: s.Note})
	}
	return x, nil
}

// NetEvent is one recorded classification outcome.
type NetEvent struct {
	Seq       uint64    `json:"seq"`
	Time      time.Time `json:"time"`
	Type      string    `json:"type"`
	Layer     string    `json:"layer"`
	FilterID  uint64    `json:"filter_id"`
	Callout   uint32    `json:"callout,omitempty"`
	Reason    string    `json:"reason"`
	Protocol  uint32    `json:"protocol"`
	Local     string    `json:"local,omitempty"`
	Remote    string    `json:"remote,omitempty"`
	AppID     string    `json:"app_id,omitempty"`
	UserID    uint32    `json:"user_id"`
	GroupID   uint32    `json:"group_id"`
	CgroupID  uint64    `json:"cgroup_id,omitempty"`
	ProcessID uint32    `json:"process_id,omitempty"`
}

func toEvent(e *api.NetEvent) NetEvent {
	return NetEvent{Seq: e.Seq, Time: time.Unix(0, e.TimeUnixNano), Type: e.Type, Layer: e.Layer, FilterID: e.FilterId,
		Callout: e.Callout, Reason: e.Reason, Protocol: e.Protocol, Local: e.Local, Remote: e.Remote, AppID: e.AppId,
		UserID: e.UserId, GroupID: e.GroupId, CgroupID: e.CgroupId, ProcessID: e.ProcessId}
}

// NetEvents returns the recorded net events with Seq ≥ since.
func (c *Client) NetEvents(ctx context.Context, since uint64) ([]NetEvent, error) {
	var out []NetEvent
	err := c.events(ctx, since, false, func(e NetEvent) error { out = append(out, e); return nil })
	return out, err
}

// FollowNetEvents calls fn for the recorded events with Seq ≥ since and
// then for each new one, until ctx ends (nil) or fn fails.
func (c *Client) FollowNetEvents(ctx context.Context, since uint64, fn func(NetEvent) error) error {
	err := c.events(ctx, since, true, fn)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (c *Client) events(ctx context.Context, since uint64, follow bool, fn func(NetEvent) error) error {
	st, err := c.rpc.NetEvents(c.ctx(ctx), &api.NetEventsRequest{Since: since, Follow: follow})
	if err != nil {
		return api.FromStatus(err)
	}
	for {
		e, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return api.FromStatus(err)
		}
		if err := fn(toEvent(e)); err != nil {
			return err
		}
	}
}

// Subscribe subscribes to committed changes of the given kinds (all when
// none) made by other sessions. The subscription is in place when it
// returns; the channel closes when ctx ends, the session closes or the
// client is closed.
func (c *Client) Subscribe(ctx context.Context, kinds ...mgmt.Kind) (<-chan mgmt.Change, error) {
	req := &api.SubscribeRequest{}
	for _, k := range kinds {
		req.Kinds = append(req.Kinds, k.String())
	}
	st, err := c.rpc.Subscribe(c.ctx(ctx), req)
	if err != nil {
		return nil, api.FromStatus(err)
	}
	md, err := st.Header()
	if err == nil && md == nil {
		// The stream ended without headers: its status says why.
		_, err = st.Recv()
	}
	if err != nil {
		return nil, api.FromStatus(err)
	}
	out := make(chan mgmt.Change, 256)
	go func() {
		defer close(out)
		for {
			ch, err := st.Recv()
			if err != nil {
				return
			}
			select {
			case out <- api.ToChange(ch):
			case <-ctx.Done():
				return
			case <-c.done: // closed client: nobody may be reading any more
				return
			}
		}
	}()
	return out, nil
}

// Drop closes the connection without closing the session, as a crashing
// process would; for tests of the daemon's cleanup.
func (c *Client) Drop() {
	c.once.Do(func() {
		c.cancel()
		c.conn.Close()
	})
}

// Version returns the daemon's build (module version, VCS revision).
func (c *Client) Version(ctx context.Context) (version.Info, error) {
	v, err := c.rpc.Version(c.ctx(ctx), &api.Empty{})
	if err != nil {
		return version.Info{}, api.FromStatus(err)
	}
	return version.Info{Version: v.GetVersion(), Revision: v.GetRevision(), Modified: v.GetModified(), GoVersion: v.GetGoVersion()}, nil
}
