package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"

	"fwp/api"
	"fwp/client"
	"fwp/engine"
	"fwp/mgmt"
)

// Exit codes.
const (
	exitFailure     = 1 // the operation failed
	exitUsage       = 2 // bad command line
	exitDenied      = 3 // the daemon refused: not an administrator
	exitUnavailable = 4 // the daemon could not be reached
)

// stdout and stderr are variables for tests. Results go to stdout, and
// only they: errors and the usage shown with them go to stderr, so that
// -o json output stays parseable.
var (
	stdout io.Writer = os.Stdout
	stderr io.Writer = os.Stderr
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) < 1 {
		usage(stderr)
		return exitUsage
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		if len(args) > 1 && args[0] == "help" {
			// fwpctl help CMD is CMD --help.
			return run(append(args[1:2:2], "--help"))
		}
		manual(stdout)
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "fwpctl: unknown command %q\n", args[0])
		usage(stderr)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := cmd(ctx, args[1:])
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "fwpctl:", err)
		return exitUsage
	}
	fmt.Fprintln(stderr, "fwpctl:", err)
	switch {
	case errors.Is(err, mgmt.ErrAccessDenied):
		return exitDenied
	case errors.Is(err, api.ErrUnavailable):
		return exitUnavailable
	}
	return exitFailure
}

var errUsage = errors.New("usage")

func usageErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
}

var commands map[string]func(context.Context, []string) error

func init() {
	commands = map[string]func(context.Context, []string) error{
		"layers":   layers,
		"provider": objectCommand(mgmt.KindProvider),
		"context":  objectCommand(mgmt.KindProviderContext),
		"sublayer": objectCommand(mgmt.KindSublayer),
		"callout":  objectCommand(mgmt.KindCallout),
		"filter":   objectCommand(mgmt.KindFilter),
		"apply":    apply,
		"explain":  explain,
		"events":   events,
		"sessions": sessions,
		"watch":    watch,
		"version":  versionCmd,
		"completion": func(ctx context.Context, args []string) error {
			return completion(args)
		},
		"fleet":    fleetCmd,
		"callouts": callouts, // callouts.go
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage: fwpctl <command> [flags]

commands:
  layers   list every layer with its fields and their types
  provider add|delete|list|show     providers
  context  add|delete|list|show     provider contexts
  sublayer add|delete|list|show     sublayers
  callout  add|delete|list|show     callouts
  filter   add|delete|list|show     filters
  apply    -f policy.yaml           apply a policy file in one transaction
  explain  --layer L --remote A:P   which filter decides a tuple, and why
  events   [--follow]               net events (classify drops, ...)
  sessions                          open sessions
  callouts                          callouts and the programs registered for them (remote callouts)
  watch    [--kind K]               follow other sessions' changes
  version                           fwpctl's and fwpd's builds
  completion bash|zsh               a shell completion script
  help     [COMMAND]                the manual, or a command's flags
  fleet    apply|delete|status      the fleet policy in etcd (--etcd-endpoints)

Every command takes --help, -o table|json, and --socket PATH (default
$FWPD_SOCKET or /run/fwp/fwpd.sock).
Exit codes: 0 ok, 1 failed, 2 usage, 3 access denied, 4 daemon unreachable.
`)
}

// common are the flags every command has.
type common struct {
	socket string
	output string
}

func newFlags(name, help string) (*flag.FlagSet, *common) {
	c := &common{}
	fs := flag.NewFlagSet("fwpctl "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // parse shows the usage, on the right stream
	fs.StringVar(&c.socket, "socket", client.SocketFromEnv(), "fwpd's unix socket (env FWPD_SOCKET)")
	fs.StringVar(&c.output, "o", "table", "output: table or json")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: fwpctl %s\n\n%s\n\nflags:\n", name, help)
		fs.PrintDefaults()
	}
	return fs, c
}

// parse parses flags anywhere among the positional arguments.
func parse(fs *flag.FlagSet, c *common, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(stdout)
				fs.Usage()
				return nil, err
			}
			fs.SetOutput(stderr)
			fs.Usage()
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if c.output != "table" && c.output != "json" {
		return nil, usageErr("-o must be table or json, not %q", c.output)
	}
	return pos, nil
}

// connect parses a command that takes flags only and connects.
func connect(ctx context.Context, fs *flag.FlagSet, c *common, args []string) (*client.Client, error) {
	pos, err := parse(fs, c, args)
	if err != nil {
		return nil, err
	}
	if len(pos) > 0 {
		return nil, usageErr("unexpected arguments %q", pos)
	}
	return c.dial(ctx)
}

func (c *common) dial(ctx context.Context) (*client.Client, error) {
	return client.Dial(ctx, c.socket, client.Options{Name: "fwpctl"})
}

func (c *common) json() bool { return c.output == "json" }

func printJSON(v any) error {
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table(header string, rows func(w io.Writer)) {
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, header)
	rows(w)
	w.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

type layerJSON struct {
	ID       engine.LayerID    `json:"id"`
	Name     string            `json:"name"`
	Pend     string            `json:"pend"`
	Writable string            `json:"writable"`
	Fields   map[string]string `json:"fields"`
}

func layers(_ context.Context, args []string) error {
	fs, c := newFlags("layers", "Lists every layer with its fields and their types (no daemon needed).")
	if pos, err := parse(fs, c, args); err != nil {
		return err
	} else if len(pos) > 0 {
		return usageErr("layers takes no arguments")
	}
	var out []layerJSON
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tLAYER\tPEND\tWRITABLE\tFIELDS")
	for _, l := range engine.Layers() {
		var fields []string
		lj := layerJSON{ID: l.ID, Name: l.Name, Fields: map[string]string{}}
		for _, f := range l.Fields {
			fields = append(fields, f.Name()+":"+f.Type().String())
			lj.Fields[f.Name()] = f.Type().String()
		}
		pend := "-"
		switch {
		case l.CanPendOperation:
			pend = "operation"
		case l.CanPendClassify:
			pend = "classify"
		}
		wr := map[engine.WritableKind]string{engine.WritableNone: "-", engine.WritableConnectRequest: "connect_request", engine.WritableBindRequest: "bind_request"}[l.Writable]
		lj.Pend, lj.Writable = pend, wr
		out = append(out, lj)
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\n", l.ID, l.Name, pend, wr, strings.Join(fields, " "))
	}
	if c.json() {
		return printJSON(out)
	}
	return w.Flush()
}

func jsonLine(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	return append(b, '\n'), err
}
