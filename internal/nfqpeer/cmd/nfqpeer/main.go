//go:build linux

package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"

	"fwp/internal/nfqpeer"
)

func main() {
	num := flag.Uint("queue", 7900, "the NFQUEUE number to read")
	flag.Parse()
	if *num > 65535 {
		fmt.Fprintln(os.Stderr, "nfqpeer: -queue out of range")
		os.Exit(2)
	}
	p, err := nfqpeer.Start(0, uint16(*num))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	n, e := p.Accepted(), p.Errors()
	p.Close()
	fmt.Println(n, e)
}
