package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"fwp/engine"
)

// Metrics holds fwpd's metrics over one engine.
type Metrics struct {
	eng      *engine.Engine
	reg      *prometheus.Registry
	classify *prometheus.CounterVec
	commit   prometheus.Histogram
}

// New registers the metrics of eng.
func New(eng *engine.Engine) *Metrics {
	m := &Metrics{eng: eng, reg: prometheus.NewRegistry()}
	m.classify = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fwp_classifications_total",
		Help: "Classifications by layer and outcome, counted from the engine's net events: drops and vetoes always, permits with fwpd --allow-events.",
	}, []string{"layer", "action"})
	m.commit = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "fwp_commit_duration_seconds",
		Help:    "Duration of committed transactions (store write and engine swap).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
	})
	m.reg.MustRegister(m.classify, m.commit, collector{eng},
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// ObserveCommit records a commit's duration (mgmt.Options.OnCommit).
func (m *Metrics) ObserveCommit(d time.Duration) { m.commit.Observe(d.Seconds()) }

// Registry returns the registry, for tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Follow counts net events until ctx ends.
func (m *Metrics) Follow(ctx context.Context) {
	sub := m.eng.SubscribeNetEvents(4096)
	defer sub.Close()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-sub.C:
			action := "block"
			switch ev.Type {
			case engine.EventClassifyAllow:
				action = "permit"
			case engine.EventClassifyVeto:
				action = "veto"
			}
			m.classify.WithLabelValues(ev.Layer.String(), action).Inc()
		}
	}
}

// Serve serves /metrics on addr until ctx ends and counts net events
// meanwhile. It returns the address listened on.
func (m *Metrics) Serve(ctx context.Context, addr string) (string, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go m.Follow(ctx)
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
type collector struct{ eng *engine.Engine }

var (
	filtersDesc = prometheus.NewDesc("fwp_filters", "Filters per layer.", []string{"layer"}, nil)
	pendsDesc   = prometheus.NewDesc("fwp_pends_outstanding", "Pended operations and classifies not yet completed.", nil, nil)
	flowsDesc   = prometheus.NewDesc("fwp_flow_contexts", "Flow contexts associated by callouts.", nil, nil)
)

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- filtersDesc
	ch <- pendsDesc
	ch <- flowsDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	v := c.eng.View()
	for _, l := range engine.Layers() {
		ch <- prometheus.MustNewConstMetric(filtersDesc, prometheus.GaugeValue, float64(v.FilterCount(l.ID)), l.Name)
	}
	o := c.eng.Outstanding()
	ch <- prometheus.MustNewConstMetric(pendsDesc, prometheus.GaugeValue, float64(o.Pends))
	ch <- prometheus.MustNewConstMetric(flowsDesc, prometheus.GaugeValue, float64(o.FlowContexts))
}
