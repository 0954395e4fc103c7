package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"

	"fwp/internal/version"
)

type versionJSON struct {
	Client version.Info  `json:"fwpctl"`
	Daemon *version.Info `json:"fwpd,omitempty"`
	Error  string        `json:"fwpd_error,omitempty"`
}

// versionCmd prints this build and the daemon's. fwpctl's own line is
// printed even when the daemon cannot be reached (then the exit code is
// 4, as for any command that needs it).
func versionCmd(ctx context.Context, args []string) error {
	fs, c := newFlags("version", "Prints fwpctl's build (module version, VCS revision, Go version) and fwpd's, asked over the API.")
	if pos, err := parse(fs, c, args); err != nil {
		return err
	} else if len(pos) > 0 {
		return usageErr("version takes no arguments")
	}
	out := versionJSON{Client: version.Get()}
	cl, err := c.dial(ctx)
	if err == nil {
		var v version.Info
		v, err = cl.Version(ctx)
		cl.Close()
		if err == nil {
			out.Daemon = &v
		}
	}
	if err != nil {
		out.Error = err.Error()
	}
	if c.json() {
		if perr := printJSON(out); perr != nil {
			return perr
		}
	} else {
		fmt.Fprintf(stdout, "fwpctl %s\n", out.Client)
		if out.Daemon != nil {
			fmt.Fprintf(stdout, "fwpd   %s\n", *out.Daemon)
		}
	}
	return err
}

// completion prints a completion script for bash or zsh. The words it
// completes are read from the commands' own --help, so they cannot drift
// from the flags the commands take.
func completion(args []string) error {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		fmt.Fprint(stdout, "usage: fwpctl completion bash|zsh\n\nPrints a shell completion script:\n\n  source <(fwpctl completion bash)        # bash, e.g. in ~/.bashrc\n  fwpctl completion zsh > \"${fpath[1]}/_fwpctl\"   # zsh\n")
		return nil
	}
	if len(args) != 1 || (args[0] != "bash" && args[0] != "zsh") {
		return usageErr("completion needs one shell: bash or zsh")
	}
	words := completionWords()
	var b strings.Builder
	switch args[0] {
	case "bash":
		b.WriteString("# bash completion for fwpctl: source <(fwpctl completion bash)\n_fwpctl() {\n")
		b.WriteString("    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} words=\"\"\n")
		b.WriteString("    case $prev in\n        -o) COMPREPLY=($(compgen -W \"table json\" -- \"$cur\")); return;;\n")
		b.WriteString("        -f|--socket|-socket) COMPREPLY=($(compgen -f -- \"$cur\")); return;;\n    esac\n")
		b.WriteString("    if [ \"$COMP_CWORD\" -eq 1 ]; then\n        words=\"" + strings.Join(words.commands, " ") + "\"\n")
		b.WriteString("    else\n        case \"${COMP_WORDS[1]} ${COMP_WORDS[2]}\" in\n")
		for _, k := range words.keys() {
			if sub, ok := words.subs[k]; ok && !strings.Contains(k, " ") {
				fmt.Fprintf(&b, "            \"%s \"*) if [ \"$COMP_CWORD\" -eq 2 ]; then words=\"%s\"; else\n                case ${COMP_WORDS[2]} in\n", k, strings.Join(sub, " "))
				for _, s := range sub {
					fmt.Fprintf(&b, "                    %s) words=\"%s\";;\n", s, strings.Join(words.flags[k+" "+s], " "))
				}
				b.WriteString("                esac; fi;;\n")
			}
		}
		for _, k := range words.keys() {
			if _, ok := words.subs[k]; !ok && !strings.Contains(k, " ") {
				fmt.Fprintf(&b, "            \"%s \"*) words=\"%s\";;\n", k, strings.Join(words.flags[k], " "))
			}
		}
		b.WriteString("        esac\n    fi\n    COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))\n}\ncomplete -o default -F _fwpctl fwpctl\n")
	case "zsh":
		b.WriteString("#compdef fwpctl\n# zsh completion for fwpctl: fwpctl completion zsh > \"${fpath[1]}/_fwpctl\"\n_fwpctl() {\n    local -a words_\n")
		b.WriteString("    if (( CURRENT == 2 )); then\n        words_=(" + strings.Join(words.commands, " ") + ")\n    else\n        case \"${words[2]}\" in\n")
		for _, k := range words.keys() {
			if strings.Contains(k, " ") {
				continue
			}
			if sub, ok := words.subs[k]; ok {
				fmt.Fprintf(&b, "            %s) if (( CURRENT == 3 )); then words_=(%s); else\n                case \"${words[3]}\" in\n", k, strings.Join(sub, " "))
				for _, s := range sub {
					fmt.Fprintf(&b, "                    %s) words_=(%s);;\n", s, strings.Join(words.flags[k+" "+s], " "))
				}
				b.WriteString("                esac; fi;;\n")
			} else {
				fmt.Fprintf(&b, "            %s) words_=(%s);;\n", k, strings.Join(words.flags[k], " "))
			}
		}
		b.WriteString("        esac\n    fi\n    compadd -- $words_\n    _files\n}\ncompdef _fwpctl fwpctl\n")
	}
	_, err := io.WriteString(stdout, b.String())
	return err
}

type compWords struct {
	commands []string
	subs     map[string][]string // object commands' subcommands
	flags    map[string][]string // "cmd" or "cmd sub" → --flags
}

func (w compWords) keys() []string {
	var ks []string
	for k := range w.flags {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

var flagLine = regexp.MustCompile(`(?m)^\s+-(\w[\w-]*)`)

// completionWords runs every command's --help and collects its flags.
func completionWords() compWords {
	w := compWords{subs: map[string][]string{}, flags: map[string][]string{}}
	helpOf := func(args ...string) []string {
		var out bytes.Buffer
		saved, savedErr := stdout, stderr
		stdout, stderr = &out, io.Discard
		defer func() { stdout, stderr = saved, savedErr }()
		cmd := commands[args[0]]
		_ = cmd(context.Background(), append(args[1:], "--help"))
		var fl []string
		for _, m := range flagLine.FindAllStringSubmatch(out.String(), -1) {
			f := "--" + m[1]
			if len(m[1]) == 1 { // -o, -f: as the usage writes them
				f = "-" + m[1]
			}
			fl = append(fl, f)
		}
		return fl
	}
	for name := range commands {
		w.commands = append(w.commands, name)
	}
	w.commands = append(w.commands, "help")
	slices.Sort(w.commands)
	for _, name := range w.commands {
		switch name {
		case "help":
			w.flags[name] = slices.DeleteFunc(slices.Clone(w.commands), func(s string) bool { return s == "help" })
		case "provider", "context", "sublayer", "callout", "filter":
			w.subs[name] = []string{"add", "delete", "list", "show"}
			w.flags[name] = nil
			for _, s := range w.subs[name] {
				w.flags[name+" "+s] = helpOf(name, s)
			}
		case "completion":
			w.flags[name] = []string{"bash", "zsh"}
		default:
			w.flags[name] = helpOf(name)
		}
	}
	return w
}

// manual is fwpctl's man-style help (fwpctl help, fwpctl --help).
func manual(w io.Writer) {
	fmt.Fprint(w, `FWPCTL(8)

NAME
    fwpctl - manage fwp, the Windows Filtering Platform's model for Linux

SYNOPSIS
    fwpctl <command> [flags] [arguments]
    fwpctl help [command]

DESCRIPTION
    fwpctl talks to fwpd, fwp's daemon, over its unix socket: it lists and
    changes the policy (providers, provider contexts, sublayers, callouts,
    filters), applies policy files in one transaction, explains which
    filter decides a connection, and follows net events and changes.
    Reading needs access to the socket; changing the policy needs root or
    a member of fwpd's --admin-group.

COMMANDS
    layers                          every layer with its fields and types
    provider|context|sublayer|callout|filter add|delete|list|show
                                    one kind of object
    apply -f FILE                   a policy file (docs/policy.md), all or nothing
    explain --layer L [tuple]       which filter decides a tuple, and why
    events [--follow] [--since N]   net events (drops; with fwpd --allow-events,
                                    permits too); --follow streams new ones
    sessions                        fwpd's open sessions
    watch [--kind K]                other sessions' committed changes
    version                         fwpctl's build and fwpd's
    completion bash|zsh             a shell completion script
    help [COMMAND]                  this page, or a command's flags

COMMON FLAGS
    --socket PATH   fwpd's socket (default $FWPD_SOCKET or /run/fwp/fwpd.sock)
    -o table|json   output; tables are for people, json is stable for scripts
    --help          the command's usage and flags

ENVIRONMENT
    FWPD_SOCKET     the socket, when --socket is not given

EXIT STATUS
    0   success
    1   the operation failed (a refused policy, an unknown key, ...)
    2   usage error (unknown command or flag, missing argument)
    3   access denied: the daemon refused the caller (not an administrator)
    4   the daemon could not be reached, or went away during the command
        (after "apply", the transaction may or may not have committed:
        fwpctl says which, and how to check)

EXAMPLES
    fwpctl apply -f examples/policies/host-firewall.yaml
    fwpctl filter list --layer ALE_AUTH_CONNECT_V4
    fwpctl explain --layer ALE_AUTH_CONNECT_V4 --remote 192.0.2.1:23 --proto tcp
    fwpctl events --follow
    source <(fwpctl completion bash)

SEE ALSO
    fwpd --help; docs/policy.md (the policy file format); README.md
`)
}
