package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"fwp/mgmt"
)

// Config configures a Follower.
type Config struct {
	Client  *clientv3.Client
	Prefix  string // e.g. "/fwp/"; documents under Prefix+"policies/"
	Manager *mgmt.Manager
	Node    Node
	// Version and Datapath are reported as they are.
	Version, Datapath string
	// Counters, when set, is a summary of the host's counters, reported
	// with every status.
	Counters func() map[string]uint64
	// LeaseTTL is the life of the host's status without news (default
	// 10 s): a host that dies vanishes from the list that long after.
	LeaseTTL time.Duration
	// StatusFile, when set, receives the host's status (JSON) whenever it
	// changes, for fwpctl fleet status --local while etcd is unreachable.
	StatusFile string
	Logger     *slog.Logger
	// OnApply, when set, is called after each revision is applied or
	// refused (benchmarks measure propagation with it).
	OnApply func(Result, error)
}

// ErrorReport is the last policy a host refused.
type ErrorReport struct {
	Revision int64     `json:"revision"`
	Error    string    `json:"error"`
	At       time.Time `json:"at"`
}

// Status is what a host reports under <prefix>nodes/<name>.
type Status struct {
	Node      string            `json:"node"`
	Labels    map[string]string `json:"labels,omitempty"`
	Revision  int64             `json:"revision"` // the revision whose policy is enforced
	Hash      string            `json:"hash"`
	Objects   int               `json:"objects"`
	AppliedAt time.Time         `json:"applied_at,omitzero"`
	LastError *ErrorReport      `json:"last_error,omitempty"`
	Version   string            `json:"version,omitempty"`
	Datapath  string            `json:"datapath,omitempty"`
	Counters  map[string]uint64 `json:"counters,omitempty"`
	// Connected is false while etcd is unreachable; the host keeps
	// enforcing Revision. Since is when Connected last changed.
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"`
	Commits   uint64    `json:"commits"` // fleet transactions committed since start
}

// Follower makes a host follow the fleet policy.
type Follower struct {
	cfg     Config
	log     *slog.Logger
	applier *Applier
	polPfx  string
	nodeKey string

	// Owned by Run's goroutine.
	docs    map[string]*parsed // at seen
	seen    int64              // revision docs are at; 0: not loaded
	relist  bool               // compacted: list the documents afresh
	rewound bool               // etcd's revisions restarted below the applied one
	kick    chan struct{}
	statMu  sync.Mutex
	status  Status
	dirty   bool
	writeMu sync.Mutex // serializes the status file
}

type parsed struct {
	modRev int64
	doc    *Document
	err    error
}

// NewFollower prepares a follower; Run runs it.
func NewFollower(cfg Config) (*Follower, error) {
	if cfg.Client == nil || cfg.Manager == nil {
		return nil, errors.New("fleet: a follower needs an etcd client and a manager")
	}
	if err := CheckName("node", cfg.Node.Name); err != nil {
		return nil, err
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	a, err := NewApplier(cfg.Manager, cfg.Node)
	if err != nil {
		return nil, err
	}
	st := a.State()
	f := &Follower{
		cfg: cfg, log: cfg.Logger.With("component", "fleet"), applier: a,
		polPfx: PoliciesPrefix(cfg.Prefix), nodeKey: NodesPrefix(cfg.Prefix) + cfg.Node.Name,
		kick: make(chan struct{}, 1),
		status: Status{Node: cfg.Node.Name, Labels: cfg.Node.Labels, Revision: st.Revision, Hash: st.Hash, Objects: len(st.Objects),
			Version: cfg.Version, Datapath: cfg.Datapath, Since: time.Now()},
	}
	return f, nil
}

// PoliciesPrefix and NodesPrefix are where documents and statuses live
// ("/fwp" is taken as "/fwp/").
func PoliciesPrefix(prefix string) string { return dir(prefix) + "policies/" }
func NodesPrefix(prefix string) string    { return dir(prefix) + "nodes/" }

func dir(prefix string) string {
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return prefix
}

// Status returns the host's status now.
func (f *Follower) Status() Status {
	f.statMu.Lock()
	defer f.statMu.Unlock()
	s := f.status
	if f.cfg.Counters != nil {
		s.Counters = f.cfg.Counters()
	}
	return s
}

func (f *Follower) update(fn func(s *Status)) {
	f.statMu.Lock()
	fn(&f.status)
	f.dirty = true
	f.statMu.Unlock()
	select {
	case f.kick <- struct{}{}:
	default:
	}
	f.writeStatusFile()
}

func (f *Follower) setConnected(ok bool) {
	f.statMu.Lock()
	changed := f.status.Connected != ok
	if changed {
		f.status.Connected, f.status.Since = ok, time.Now()
	}
	rev := f.status.Revision
	f.statMu.Unlock()
	if changed {
		if ok {
			f.log.Info("etcd reachable", "revision", rev)
		} else {
			f.log.Warn("etcd unreachable: enforcing the policy in force", "revision", rev)
		}
		f.writeStatusFile()
	}
}

func (f *Follower) writeStatusFile() {
	if f.cfg.StatusFile == "" {
		return
	}
	f.writeMu.Lock()
	defer f.writeMu.Unlock()
	b, _ := json.MarshalIndent(f.Status(), "", "  ")
	tmp := f.cfg.StatusFile + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err == nil {
		os.Rename(tmp, f.cfg.StatusFile)
	}
}

// Run follows the policy until ctx ends; it then deletes the host's
// status (a host that stops cleanly leaves the list at once).
func (f *Follower) Run(ctx context.Context) error {
	defer f.applier.Close()
	if f.cfg.StatusFile != "" {
		os.MkdirAll(filepath.Dir(f.cfg.StatusFile), 0o755)
		f.writeStatusFile()
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); f.report(ctx) }()
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		err := f.follow(ctx)
		if ctx.Err() != nil {
			break
		}
		f.log.Warn("watching the fleet policy", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
	wg.Wait()
	return nil
}

// follow loads the documents at the revision in force (or lists them
// after a compaction), then applies each revision the watch brings.
func (f *Follower) follow(ctx context.Context) error {
	cl := f.cfg.Client
	if f.seen == 0 || f.relist {
		rev := f.applier.Revision()
		var resp *clientv3.GetResponse
		var err error
		if rev > 0 && !f.relist {
			resp, err = cl.Get(ctx, f.polPfx, clientv3.WithPrefix(), clientv3.WithRev(rev))
			if errors.Is(err, rpctypes.ErrCompacted) {
				f.log.Info("the applied revision is compacted: listing the documents", "revision", rev)
				f.relist = true
				return f.follow(ctx)
			}
			if errors.Is(err, rpctypes.ErrFutureRev) {
				// etcd is behind what this host applied: a new or restored
				// cluster. Its documents are the policy now.
				f.log.Warn("etcd's revision is behind the applied one (a new or restored cluster?): listing the documents", "revision", rev)
				f.relist, f.rewound = true, true
				return f.follow(ctx)
			}
			if err != nil {
				return err
			}
			f.docs = map[string]*parsed{}
			f.load(resp)
			f.seen = rev
		} else {
			resp, err = cl.Get(ctx, f.polPfx, clientv3.WithPrefix())
			if err != nil {
				return err
			}
			f.docs = map[string]*parsed{}
			f.load(resp)
			f.seen = resp.Header.Revision
			f.relist = false
			if f.rewound {
				f.applier.rewind()
				f.rewound = false
			}
			f.apply(ctx, resp.Header.Revision)
		}
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := cl.Watch(wctx, f.polPfx, clientv3.WithPrefix(), clientv3.WithRev(f.seen+1))
	for wr := range wch {
		if wr.CompactRevision != 0 {
			f.relist = true
			return fmt.Errorf("revision %d is compacted (oldest kept %d)", f.seen+1, wr.CompactRevision)
		}
		if err := wr.Err(); err != nil {
			return err
		}
		// Events of one revision are one transaction; a response may
		// carry several revisions, in order.
		for i := 0; i < len(wr.Events); {
			rev := wr.Events[i].Kv.ModRevision
			j := i
			for ; j < len(wr.Events) && wr.Events[j].Kv.ModRevision == rev; j++ {
				ev := wr.Events[j]
				name := strings.TrimPrefix(string(ev.Kv.Key), f.polPfx)
				if ev.Type == clientv3.EventTypeDelete {
					delete(f.docs, name)
				} else {
					f.docs[name] = parseKV(name, ev.Kv.Value, ev.Kv.ModRevision)
				}
			}
			i = j
			f.seen = rev
			f.apply(ctx, rev)
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.New("the watch ended")
}

func (f *Follower) load(resp *clientv3.GetResponse) {
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), f.polPfx)
		f.docs[name] = parseKV(name, kv.Value, kv.ModRevision)
	}
}

func parseKV(name string, v []byte, modRev int64) *parsed {
	d, err := ParseDocument(name, v)
	return &parsed{modRev: modRev, doc: d, err: err}
}

// apply applies the documents at rev, or reports why not.
func (f *Follower) apply(ctx context.Context, rev int64) {
	if rev <= f.applier.Revision() {
		return // in force already (a restart resumes after it)
	}
	var docs []*Document
	var errs []error
	for _, p := range f.docs {
		if p.err != nil {
			errs = append(errs, p.err)
			continue
		}
		docs = append(docs, p.doc)
	}
	var res Result
	err := errors.Join(errs...)
	if err == nil {
		res, err = f.applier.Apply(ctx, rev, docs)
	}
	if err != nil {
		f.log.Error("fleet policy refused: the previous policy stays in force", "revision", rev, "enforced", f.applier.Revision(), "err", err)
		f.update(func(s *Status) { s.LastError = &ErrorReport{Revision: rev, Error: err.Error(), At: time.Now()} })
	} else {
		if res.Committed {
			f.log.Info("fleet policy applied", "revision", rev, "hash", res.Hash, "added", res.Added, "deleted", res.Deleted, "objects", res.Objects)
		}
		f.update(func(s *Status) {
			s.Revision, s.Hash, s.Objects, s.AppliedAt = rev, res.Hash, res.Objects, time.Now()
			if res.Committed {
				s.Commits++
			}
		})
	}
	if f.cfg.OnApply != nil {
		f.cfg.OnApply(res, err)
	}
}
