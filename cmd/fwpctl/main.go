// Command fwpctl is fwp's command-line client.
package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"fwp/engine"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		return
	}
	switch os.Args[1] {
	case "layers":
		layers()
	default:
		fmt.Fprintf(os.Stderr, "fwpctl: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
}

func usage() {
	fmt.Println(`usage: fwpctl <command>

commands:
  layers   list every layer with its fields and their types`)
}

func layers() {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tLAYER\tPEND\tWRITABLE\tFIELDS")
	for _, l := range engine.Layers() {
		var fs []string
		for _, f := range l.Fields {
			fs = append(fs, f.Name()+":"+f.Type().String())
		}
		pend := "-"
		switch {
		case l.CanPendOperation:
			pend = "operation"
		case l.CanPendClassify:
			pend = "classify"
		}
		wr := map[engine.WritableKind]string{engine.WritableNone: "-", engine.WritableConnectRequest: "connect_request", engine.WritableBindRequest: "bind_request"}[l.Writable]
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\n", l.ID, l.Name, pend, wr, strings.Join(fs, " "))
	}
	w.Flush()
}
