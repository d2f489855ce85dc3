// Command netprobe is a static test client copied into guests by the e2e
// tests: busybox's wget needs glibc's NSS at run time, which a busybox
// image lacks.
//
//	netprobe get URL            print the body of a GET (exit 1 on error)
//	netprobe tcp HOST:PORT MSG  send MSG, print the reply
//	netprobe udp HOST:PORT MSG  send one datagram, print a reply within 2 s
//	netprobe resolve NAME       print the A records
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: netprobe get URL | tcp ADDR MSG | udp ADDR MSG | resolve NAME")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2:]); err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
}

func run(cmd string, args []string) error {
	switch cmd {
	case "get":
		c := &http.Client{Timeout: 10 * time.Second}
		req, err := http.NewRequest("GET", args[0], nil)
		if err != nil {
			return err
		}
		if len(args) > 1 {
			req.Header.Set("Authorization", args[1])
		}
		r, err := c.Do(req)
		if err != nil {
			return err
		}
		defer r.Body.Close()
		b, err := io.ReadAll(r.Body)
		fmt.Printf("%d %s\n", r.StatusCode, b)
		return err
	case "tcp", "udp":
		c, err := net.DialTimeout(cmd, args[0], 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte(args[1])); err != nil {
			return err
		}
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		fmt.Printf("%s\n", buf[:n])
		return nil
	case "resolve":
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ips, err := net.DefaultResolver.LookupHost(ctx, args[0])
		if err != nil {
			return err
		}
		for _, ip := range ips {
			fmt.Println(ip)
		}
		return nil
	}
	return fmt.Errorf("unknown command %q", cmd)
}
