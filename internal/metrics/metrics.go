package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"fwp/engine"
)

// Metrics holds fwpd's metrics over one engine.
type Metrics struct {
	eng    *engine.Engine
	reg    *prometheus.Registry
	commit prometheus.Histogram

	mu     sync.Mutex
	counts []func() ([]engine.ClassifyCount, error)
}

// New registers the metrics of eng.
func New(eng *engine.Engine) *Metrics {
	m := &Metrics{eng: eng, reg: prometheus.NewRegistry()}
	m.commit = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "fwp_commit_duration_seconds",
		Help:    "Duration of committed transactions (store write and engine swap).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
	})
	m.reg.MustRegister(m.commit, collector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// AddClassifyCounts adds a datapath's own classification counts (the
// kernel's, decided in its hooks without the engine) to
// fwp_classifications_total.
func (m *Metrics) AddClassifyCounts(f func() ([]engine.ClassifyCount, error)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.counts = append(m.counts, f)
}

// classifyCounts sums the engine's counts and every datapath's by layer.
func (m *Metrics) classifyCounts() []engine.ClassifyCount {
	all := m.eng.ClassifyCounts()
	at := make(map[engine.LayerID]int, len(all))
	for i, n := range all {
		at[n.Layer] = i
	}
	m.mu.Lock()
	sources := m.counts
	m.mu.Unlock()
	for _, f := range sources {
		more, err := f()
		if err != nil {
			continue // a closed datapath: what it counted is gone with it
		}
		for _, n := range more {
			i, ok := at[n.Layer]
			if !ok {
				at[n.Layer] = len(all)
				all = append(all, n)
				continue
			}
			all[i].Permit += n.Permit
			all[i].Block += n.Block
			all[i].Veto += n.Veto
			all[i].Pend += n.Pend
		}
	}
	return all
}

// ObserveCommit records a commit's duration (mgmt.Options.OnCommit).
func (m *Metrics) ObserveCommit(d time.Duration) { m.commit.Observe(d.Seconds()) }

// Registry returns the registry, for tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Serve serves /metrics on addr until ctx ends. It returns the address
// listened on.
func (m *Metrics) Serve(ctx context.Context, addr string) (string, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	return l.Addr().String(), nil
}

// collector reads the engine's gauges at scrape time.
type collector struct{ m *Metrics }

var (
	filtersDesc = prometheus.NewDesc("fwp_filters", "Filters per layer.", []string{"layer"}, nil)
	pendsDesc   = prometheus.NewDesc("fwp_pends_outstanding", "Pended operations and classifies not yet completed.", nil, nil)
	flowsDesc   = prometheus.NewDesc("fwp_flow_contexts", "Flow contexts associated by callouts.", nil, nil)
	classDesc   = prometheus.NewDesc("fwp_classifications_total", "Classifications by layer and outcome (permit, block, veto, pend): the engine's and the kernel datapath's hooks'.", []string{"layer", "action"}, nil)
)

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- filtersDesc
	ch <- pendsDesc
	ch <- flowsDesc
	ch <- classDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	v := c.m.eng.View()
	for _, l := range engine.Layers() {
		ch <- prometheus.MustNewConstMetric(filtersDesc, prometheus.GaugeValue, float64(v.FilterCount(l.ID)), l.Name)
	}
	o := c.m.eng.Outstanding()
	ch <- prometheus.MustNewConstMetric(pendsDesc, prometheus.GaugeValue, float64(o.Pends))
	ch <- prometheus.MustNewConstMetric(flowsDesc, prometheus.GaugeValue, float64(o.FlowContexts))
	for _, n := range c.m.classifyCounts() {
		for _, kv := range []struct {
			action string
			n      uint64
		}{{"permit", n.Permit}, {"block", n.Block}, {"veto", n.Veto}, {"pend", n.Pend}} {
			ch <- prometheus.MustNewConstMetric(classDesc, prometheus.CounterValue, float64(kv.n), n.Layer.String(), kv.action)
		}
	}
}
