package server

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"fwp/api"
	"fwp/engine"
	"fwp/internal/peercred"
	"fwp/mgmt"
	"fwp/policy"
)

// SessionHeader is the metadata key that carries a call's session ID.
const SessionHeader = "fwp-session"

// DefaultMaxMsgBytes bounds a request (gRPC's own default).
const DefaultMaxMsgBytes = 4 << 20

// MaxStreamsPerConn bounds the concurrent calls of one connection: each
// session, subscription and follow is a stream holding daemon memory.
const MaxStreamsPerConn = 256

// Config configures a Server.
type Config struct {
	Manager *mgmt.Manager
	Logger  *slog.Logger
	// Who may change policy: root (unless NoRootAdmin), the listed users,
	// and members (primary or supplementary) of the listed groups.
	AdminUIDs   []uint32
	AdminGIDs   []uint32
	NoRootAdmin bool
	// Who may read the policy, explain, read net events and subscribe
	// (see Role): the listed users and members of the listed groups.
	ReaderUIDs []uint32
	ReaderGIDs []uint32
	// MaxMsgBytes bounds a request; larger ones fail with ErrTooLarge.
	MaxMsgBytes int
	// Redirects answers QueryRedirect (the kernel datapath); nil: the
	// call fails with proxy.ErrNotSupported.
	Redirects RedirectSource
	// MaxConnections bounds the connections served at once (see
	// LimitListener); 0 means DefaultMaxConnections.
	MaxConnections int
	// MaxConnectionsPerUser bounds one user's (root excepted); 0 means
	// DefaultMaxConnectionsPerUser, < 0 no bound of its own.
	MaxConnectionsPerUser int
	// HandshakeTimeout bounds how long a new connection may take to start
	// speaking gRPC before it is closed (and its slot freed); 0 means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
}

// DefaultHandshakeTimeout: a local client sends gRPC's preface at once; one
// that connects and stays silent must not hold a connection slot for
// gRPC's own default of two minutes.
const DefaultHandshakeTimeout = 10 * time.Second

// Server is fwpd's service.
type Server struct {
	api.UnimplementedManagementServer
	cfg  Config
	m    *mgmt.Manager
	log  *slog.Logger
	grpc *grpc.Server
	// quit ends the long-lived streams (sessions, follows) at shutdown,
	// which a graceful stop would otherwise wait for.
	quit     chan struct{}
	quitOnce sync.Once

	calloutsOnce sync.Once
	callouts     *Callouts // callouts.go
}

// New returns a server; call Serve with a unix listener.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxMsgBytes <= 0 {
		cfg.MaxMsgBytes = DefaultMaxMsgBytes
	}
	if cfg.MaxConnections <= 0 {
		cfg.MaxConnections = DefaultMaxConnections
	}
	if cfg.MaxConnectionsPerUser == 0 {
		cfg.MaxConnectionsPerUser = DefaultMaxConnectionsPerUser
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	s := &Server{cfg: cfg, m: cfg.Manager, log: cfg.Logger, quit: make(chan struct{})}
	s.grpc = grpc.NewServer(
		grpc.Creds(peercred.Credentials()),
		grpc.MaxRecvMsgSize(cfg.MaxMsgBytes),
		grpc.MaxConcurrentStreams(MaxStreamsPerConn),
		grpc.ConnectionTimeout(cfg.HandshakeTimeout),
		grpc.ChainUnaryInterceptor(s.unary),
		grpc.ChainStreamInterceptor(s.stream),
	)
	api.RegisterManagementServer(s.grpc, s)
	return s
}

// Serve serves on l until Stop, at most Config.MaxConnections
// connections at once, the last sixteenth of them kept for root and the
// administrators.
func (s *Server) Serve(l net.Listener) error {
	return s.grpc.Serve(LimitListener(l, Limits{Max: s.cfg.MaxConnections, PerUser: s.cfg.MaxConnectionsPerUser, Privileged: s.mayTakeReserve}, s.log))
}

// mayTakeReserve: root (an administrator or not) and the administrators
// get the connection slots kept in reserve.
func (s *Server) mayTakeReserve(c peercred.Cred) bool {
	return c.UID == 0 || s.isAdmin(c)
}

// Stop ends every call and closes the listeners.
func (s *Server) Stop() {
	s.quitOnce.Do(func() { close(s.quit) })
	s.grpc.Stop()
}

// GracefulStop stops accepting, ends the session and follow streams, lets
// running calls end within d, then stops.
func (s *Server) GracefulStop(d time.Duration) {
	s.quitOnce.Do(func() { close(s.quit) })
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		s.grpc.Stop()
	}
}

func (s *Server) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer s.recoverCall(info.FullMethod, &err)
	if err := s.authorize(ctx, info.FullMethod); err != nil {
		return nil, api.Status(err)
	}
	start := time.Now()
	resp, err = h(ctx, req)
	if err != nil {
		s.log.Debug("call failed", "method", info.FullMethod, "err", err, "took", time.Since(start))
	}
	return resp, api.Status(err)
}

func (s *Server) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
	defer s.recoverCall(info.FullMethod, &err)
	if err := s.authorize(ss.Context(), info.FullMethod); err != nil {
		return api.Status(err)
	}
	return api.Status(h(srv, ss))
}

// recoverCall turns a handler's panic into a typed error for its caller:
// one bad request must not take down the daemon and every other session.
func (s *Server) recoverCall(method string, err *error) {
	if r := recover(); r != nil {
		s.log.Error("call panicked", "method", method, "panic", r, "stack", string(debug.Stack()))
		*err = api.Status(fmt.Errorf("%w: %s failed: %v", mgmt.ErrInternal, method, r))
	}
}

// session returns the call's session ID (0 when it names none), checking
// that the session belongs to the calling process.
func (s *Server) session(ctx context.Context) (uint64, mgmt.SessionInfo, error) {
	cred, err := peercred.FromContext(ctx)
	if err != nil {
		return 0, mgmt.SessionInfo{}, fmt.Errorf("%w: %w", mgmt.ErrAccessDenied, err)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(SessionHeader)
	if len(v) == 0 {
		return 0, mgmt.SessionInfo{PID: cred.PID, UID: cred.UID, GID: cred.GID, Admin: s.isAdmin(cred)}, nil
	}
	id, err := strconv.ParseUint(v[0], 10, 64)
	if err != nil {
		return 0, mgmt.SessionInfo{}, fmt.Errorf("%w: bad session header %q", mgmt.ErrSessionNotFound, v[0])
	}
	info, err := s.m.Session(id)
	if err != nil {
		return 0, mgmt.SessionInfo{}, err
	}
	if info.PID != cred.PID || info.UID != cred.UID {
		return 0, mgmt.SessionInfo{}, fmt.Errorf("%w: session #%d belongs to another process", mgmt.ErrAccessDenied, id)
	}
	return id, info, nil
}

// writer returns the session of a call that changes policy, which needs
// the rights r.
func (s *Server) writer(ctx context.Context, r Right, what string) (uint64, error) {
	if _, err := s.need(ctx, r, what); err != nil {
		return 0, err
	}
	id, _, err := s.session(ctx)
	if err != nil {
		return 0, err
	}
	if id == 0 {
		return 0, fmt.Errorf("%w: this call needs a session", mgmt.ErrSessionNotFound)
	}
	return id, nil
}

func (s *Server) OpenSession(req *api.OpenSessionRequest, st grpc.ServerStreamingServer[api.Session]) error {
	if _, err := s.need(st.Context(), RightOpen, "open a session"); err != nil {
		return err
	}
	cred, err := peercred.FromContext(st.Context())
	if err != nil {
		return fmt.Errorf("%w: %w", mgmt.ErrAccessDenied, err)
	}
	info := s.m.OpenSession(mgmt.SessionInfo{PID: cred.PID, UID: cred.UID, GID: cred.GID,
		Name: req.GetName(), Dynamic: req.GetDynamic(), Admin: s.isAdmin(cred)})
	// Whatever ends the stream (a close, the client's death, daemon
	// shutdown) closes the session and deletes its dynamic objects.
	defer s.m.CloseSession(info.ID)
	if err := st.Send(api.FromSession(info)); err != nil {
		return err
	}
	select {
	case <-st.Context().Done():
	case <-s.quit:
	}
	return nil
}

func (s *Server) CloseSession(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	id, _, err := s.session(ctx)
	if err != nil {
		return nil, err
	}
	if id == 0 {
		return nil, fmt.Errorf("%w: no session to close", mgmt.ErrSessionNotFound)
	}
	return &api.Empty{}, s.m.CloseSession(id)
}

func (s *Server) Sessions(ctx context.Context, _ *api.Empty) (*api.SessionList, error) {
	if _, err := s.need(ctx, RightEnum, "list sessions"); err != nil {
		return nil, err
	}
	if _, _, err := s.session(ctx); err != nil {
		return nil, err
	}
	out := &api.SessionList{}
	for _, si := range s.m.Sessions() {
		out.Sessions = append(out.Sessions, api.FromSession(si))
	}
	return out, nil
}

func (s *Server) Begin(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	id, err := s.writer(ctx, RightWriteTxn, "begin a transaction")
	if err != nil {
		return nil, err
	}
	return &api.Empty{}, s.m.Begin(ctx, id)
}

func (s *Server) Commit(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	id, err := s.writer(ctx, RightWriteTxn, "commit a transaction")
	if err != nil {
		return nil, err
	}
	return &api.Empty{}, s.m.Commit(id)
}

func (s *Server) Abort(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	id, err := s.writer(ctx, RightWriteTxn, "abort a transaction")
	if err != nil {
		return nil, err
	}
	return &api.Empty{}, s.m.Abort(id)
}

func (s *Server) Apply(ctx context.Context, req *api.ApplyRequest) (*api.ApplyResponse, error) {
	// Each op needs its own right (a policy file adds), checked before
	// anything is parsed.
	need := Right(0)
	if len(req.GetPolicy()) > 0 {
		need |= RightAdd
	}
	for _, op := range req.GetOps() {
		if op.GetDelete() != nil {
			need |= RightDelete
		} else {
			need |= RightAdd
		}
	}
	if need == 0 {
		need = RightAdd // nothing to do, but still a write
	}
	id, err := s.writer(ctx, need, "change the policy")
	if err != nil {
		return nil, err
	}
	ops, err := api.ToOps(req.GetOps())
	if err != nil {
		return nil, err
	}
	if len(req.GetPolicy()) > 0 {
		name := req.GetPolicyName()
		if name == "" {
			name = "policy"
		}
		pol, err := policy.ParseWith(name, req.GetPolicy(), policy.Options{ValuesFiles: req.GetValuesFiles()})
		if err != nil {
			return nil, err
		}
		if pol.Nodes != nil { // fleet rules (persistent, no deletes) do not hold here
			return nil, fmt.Errorf("%w: %s: a nodes section selects fleet hosts; write the document with fwpctl fleet apply", mgmt.ErrInvalidPolicy, name)
		}
		ops = append(ops, pol.Ops...)
	}
	res, err := s.m.Apply(ctx, id, ops)
	if err != nil {
		return nil, err
	}
	out := &api.ApplyResponse{}
	for _, r := range res.Added {
		out.Added = append(out.Added, api.FromRef(r))
	}
	for _, r := range res.Deleted {
		out.Deleted = append(out.Deleted, api.FromRef(r))
	}
	out.Warnings = res.Warnings
	return out, nil
}

func (s *Server) Get(ctx context.Context, req *api.ObjectRef) (*api.Object, error) {
	role, err := s.need(ctx, RightRead, "read objects")
	if err != nil {
		return nil, err
	}
	id, _, err := s.session(ctx)
	if err != nil {
		return nil, err
	}
	r, err := api.ToRef(req)
	if err != nil {
		return nil, err
	}
	o, err := s.m.Get(id, r)
	if err != nil {
		return nil, err
	}
	return api.FromObject(redact(role, o)), nil
}

func (s *Server) List(ctx context.Context, req *api.ListRequest) (*api.ObjectList, error) {
	role, err := s.need(ctx, RightEnum|RightRead, "list objects")
	if err != nil {
		return nil, err
	}
	id, _, err := s.session(ctx)
	if err != nil {
		return nil, err
	}
	k, err := mgmt.ParseKind(req.GetKind())
	if err != nil {
		return nil, err
	}
	objs, err := s.m.List(id, k, mgmt.Template{Layer: req.GetLayer(), Sublayer: req.GetSublayer(),
		Provider: req.GetProvider(), Callout: req.GetCallout(), Action: req.GetAction()})
	if err != nil {
		return nil, err
	}
	out := &api.ObjectList{Objects: make([]*api.Object, 0, len(objs))}
	for _, o := range objs {
		out.Objects = append(out.Objects, api.FromObject(redact(role, o)))
	}
	return out, nil
}

func (s *Server) Explain(ctx context.Context, req *api.ExplainRequest) (*api.ExplainResponse, error) {
	if _, err := s.need(ctx, RightRead, "explain decisions"); err != nil {
		return nil, err
	}
	if _, _, err := s.session(ctx); err != nil {
		return nil, err
	}
	x, err := s.m.Explain(req.GetLayer(), req.GetValues())
	if err != nil {
		return nil, err
	}
	l, _ := mgmt.ParseLayer(req.GetLayer())
	vs, _ := mgmt.ParseValues(l, req.GetValues())
	return api.FromExplanation(x, vs.String()), nil
}

func (s *Server) NetEvents(req *api.NetEventsRequest, st grpc.ServerStreamingServer[api.NetEvent]) error {
	if _, err := s.need(st.Context(), RightReadEvents, "read net events"); err != nil {
		return err
	}
	if _, _, err := s.session(st.Context()); err != nil {
		return err
	}
	eng := s.m.Engine()
	// Subscribe before reading the ring, so that no event falls between.
	var c <-chan engine.NetEvent
	if req.GetFollow() {
		sub := eng.SubscribeNetEvents(1024)
		defer sub.Close()
		c = sub.C
		// As for Subscribe: an empty header says the follow is in place.
		if err := st.SendHeader(metadata.MD{}); err != nil {
			return err
		}
	}
	// Events before since are not wanted, from the ring or the follow.
	last := max(req.GetSince(), 1) - 1
	for _, ev := range eng.NetEvents(req.GetSince()) {
		if err := st.Send(api.FromNetEvent(ev)); err != nil {
			return err
		}
		last = ev.Seq
	}
	if c == nil {
		return nil
	}
	_, err := follow(st.Context(), s.quit, c, func(ev engine.NetEvent) error {
		if ev.Seq <= last {
			return nil // already sent from the ring
		}
		return st.Send(api.FromNetEvent(ev))
	})
	return err
}

// follow passes what c delivers to send until the client goes away, the
// server shuts down (both nil) or c closes (closed).
func follow[T any](ctx context.Context, quit <-chan struct{}, c <-chan T, send func(T) error) (closed bool, err error) {
	for {
		select {
		case <-ctx.Done():
			return false, nil
		case <-quit:
			return false, nil
		case v, ok := <-c:
			if !ok {
				return true, nil
			}
			if err := send(v); err != nil {
				return false, err
			}
		}
	}
}

func (s *Server) Subscribe(req *api.SubscribeRequest, st grpc.ServerStreamingServer[api.Change]) error {
	if _, err := s.need(st.Context(), RightSubscribe, "subscribe to changes"); err != nil {
		return err
	}
	id, _, err := s.session(st.Context())
	if err != nil {
		return err
	}
	if id == 0 {
		return fmt.Errorf("%w: subscribing needs a session", mgmt.ErrSessionNotFound)
	}
	var kinds []mgmt.Kind
	for _, k := range req.GetKinds() {
		kk, err := mgmt.ParseKind(k)
		if err != nil {
			return err
		}
		kinds = append(kinds, kk)
	}
	sub, err := s.m.Subscribe(id, kinds, 4096)
	if err != nil {
		return err
	}
	defer sub.Close()
	// An empty header tells the client the subscription is in place.
	if err := st.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	closed, err := follow(st.Context(), s.quit, sub.C, func(c mgmt.Change) error { return st.Send(api.FromChange(c)) })
	if closed {
		return fmt.Errorf("%w: session #%d closed, which ends its subscriptions", mgmt.ErrSessionNotFound, id)
	}
	return err
}
