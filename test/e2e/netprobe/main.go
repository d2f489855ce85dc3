// Command netprobe is a static test client copied into guests by the e2e
// tests and bench/network: busybox's wget needs glibc's NSS at run time,
// which a busybox image lacks. TLS uses the guest's trust store
// (SSL_CERT_FILE, else the distribution bundles).
//
//	netprobe get URL [AUTH]     print "STATUS BODY" of a GET (exit 1 on error)
//	netprobe req [flags] URL    a request: -X METHOD, -H 'K: V' (repeatable),
//	                            -d BODY, -host HOST (Host header), -sni NAME
//	                            (TLS server name), -h1 (no HTTP/2), -k (do
//	                            not verify the server); prints
//	                            "STATUS PROTO" then the body
//	netprobe ws URL MSG         WebSocket (ws:// or wss://): handshake, send
//	                            MSG, print the first message back; -H too
//	netprobe tcp HOST:PORT MSG  send MSG, print the reply
//	netprobe udp HOST:PORT MSG  send one datagram, print a reply within 2 s
//	netprobe resolve NAME       print the A records (the system resolver)
//	netprobe dns SERVER NAME    one raw UDP DNS A query to SERVER (host:port),
//	                            print the answer's addresses or rcode
//	netprobe upload URL BYTES   POST BYTES zero bytes, print MB/s
//	netprobe download URL       GET, discard the body, print bytes and MB/s
//	netprobe connects ADDR N    N sequential TCP connects, 1 byte each way
//	                            (ADDR resolved once), print the mean time in ms
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: netprobe get|req|ws|tcp|udp|resolve|dns|upload|download|connects ...")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2:]); err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
}

type reqFlags struct {
	method, body, host, sni string
	headers                 []string
	h1, insecure            bool
}

// parseFlags takes the leading -X/-H/-d/-host/-sni/-h1 flags off args.
func parseFlags(args []string) (reqFlags, []string, error) {
	f := reqFlags{method: "GET"}
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		flag := args[0]
		if flag == "-h1" || flag == "-k" {
			f.h1 = f.h1 || flag == "-h1"
			f.insecure = f.insecure || flag == "-k"
			args = args[1:]
			continue
		}
		if len(args) < 2 {
			return f, nil, fmt.Errorf("%s needs a value", flag)
		}
		v := args[1]
		args = args[2:]
		switch flag {
		case "-X":
			f.method = v
		case "-H":
			f.headers = append(f.headers, v)
		case "-d":
			f.body = v
			if f.method == "GET" {
				f.method = "POST"
			}
		case "-host":
			f.host = v
		case "-sni":
			f.sni = v
		default:
			return f, nil, fmt.Errorf("unknown flag %s", flag)
		}
	}
	return f, args, nil
}

func client(f reqFlags) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	tr.TLSClientConfig = &tls.Config{ServerName: f.sni, InsecureSkipVerify: f.insecure}
	if f.h1 {
		tr.ForceAttemptHTTP2 = false
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	} else {
		tr.ForceAttemptHTTP2 = true
	}
	return &http.Client{Transport: tr, Timeout: 20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
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
	case "req":
		f, rest, err := parseFlags(args)
		if err != nil {
			return err
		}
		if len(rest) != 1 {
			return errors.New("req: want one URL")
		}
		var body io.Reader
		if f.body != "" {
			body = strings.NewReader(f.body)
		}
		req, err := http.NewRequest(f.method, rest[0], body)
		if err != nil {
			return err
		}
		for _, h := range f.headers {
			k, v, _ := strings.Cut(h, ":")
			req.Header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
		}
		if f.host != "" {
			req.Host = f.host
		}
		r, err := client(f).Do(req)
		if err != nil {
			return err
		}
		defer r.Body.Close()
		fmt.Printf("%d %s\n", r.StatusCode, r.Proto)
		_, err = io.Copy(os.Stdout, r.Body)
		fmt.Println()
		return err
	case "ws":
		f, rest, err := parseFlags(args)
		if err != nil {
			return err
		}
		if len(rest) != 2 {
			return errors.New("ws: want URL MSG")
		}
		return websocket(f, rest[0], rest[1])
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
	case "dns":
		if len(args) != 2 {
			return errors.New("dns: want SERVER NAME")
		}
		return rawDNS(args[0], args[1])
	case "upload":
		n, err := strconv.ParseInt(args[1], 10, 64)
		if err != nil {
			return err
		}
		t0 := time.Now()
		r, err := client(reqFlags{h1: true}).Post(args[0], "application/octet-stream", io.LimitReader(zeros{}, n))
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(r.Body)
		r.Body.Close()
		d := time.Since(t0)
		fmt.Printf("%d bytes %.3f s %.1f MB/s (server: %s)\n", n, d.Seconds(), float64(n)/d.Seconds()/1e6, strings.TrimSpace(string(b)))
		return nil
	case "download":
		t0 := time.Now()
		c := client(reqFlags{h1: true})
		c.Timeout = 10 * time.Minute
		r, err := c.Get(args[0])
		if err != nil {
			return err
		}
		n, err := io.CopyBuffer(io.Discard, r.Body, make([]byte, 256<<10))
		r.Body.Close()
		d := time.Since(t0)
		fmt.Printf("%d bytes %.3f s %.1f MB/s\n", n, d.Seconds(), float64(n)/d.Seconds()/1e6)
		return err
	case "connects":
		n, err := strconv.Atoi(args[1])
		if err != nil {
			return err
		}
		// Resolve once: this measures connections, not DNS.
		host, port, err := net.SplitHostPort(args[0])
		if err != nil {
			return err
		}
		ips, err := net.DefaultResolver.LookupHost(context.Background(), host)
		if err != nil {
			return err
		}
		addr := net.JoinHostPort(ips[0], port)
		t0 := time.Now()
		b := make([]byte, 1)
		for i := 0; i < n; i++ {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				return err
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte("0")); err != nil { // not a letter: no HTTP inspection wait
				return err
			}
			if _, err := io.ReadFull(c, b); err != nil {
				return err
			}
			c.Close()
		}
		d := time.Since(t0)
		fmt.Printf("%d connects %.3f ms each\n", n, float64(d.Microseconds())/1000/float64(n))
		return nil
	}
	return fmt.Errorf("unknown command %q", cmd)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// websocket does a minimal RFC 6455 exchange: handshake, one masked text
// frame out, one frame back.
func websocket(f reqFlags, raw, msg string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	host := u.Host
	if u.Port() == "" {
		if u.Scheme == "wss" {
			host += ":443"
		} else {
			host += ":80"
		}
	}
	c, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if u.Scheme == "wss" {
		sni := u.Hostname()
		if f.sni != "" {
			sni = f.sni
		}
		tc := tls.Client(c, &tls.Config{ServerName: sni, NextProtos: []string{"http/1.1"}})
		if err := tc.Handshake(); err != nil {
			return err
		}
		c = tc
	}
	var key [16]byte
	rand.Read(key[:])
	k := base64.StdEncoding.EncodeToString(key[:])
	hostHdr := u.Host
	if f.host != "" {
		hostHdr = f.host
	}
	req := "GET " + u.RequestURI() + " HTTP/1.1\r\nHost: " + hostHdr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + k + "\r\n"
	for _, h := range f.headers {
		req += h + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		return err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return err
	}
	if resp.StatusCode != 101 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("handshake: %d %s", resp.StatusCode, b)
	}
	sum := sha1.Sum([]byte(k + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		return errors.New("bad Sec-WebSocket-Accept")
	}
	// Client frame: FIN + text, masked, length < 126.
	if len(msg) > 125 {
		return errors.New("message too long")
	}
	var mask [4]byte
	rand.Read(mask[:])
	frame := []byte{0x81, 0x80 | byte(len(msg))}
	frame = append(frame, mask[:]...)
	for i := 0; i < len(msg); i++ {
		frame = append(frame, msg[i]^mask[i%4])
	}
	if _, err := c.Write(frame); err != nil {
		return err
	}
	var h [2]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return err
	}
	n := int(h[1] & 0x7f)
	if n >= 126 {
		return errors.New("long frames not supported")
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(br, p); err != nil {
		return err
	}
	fmt.Printf("%s\n", p)
	return nil
}

// rawDNS sends one A query for name to server over UDP and prints the
// answer's addresses (or the rcode); no answer within 3 s is an error.
func rawDNS(server, name string) error {
	var id [2]byte
	rand.Read(id[:])
	q := []byte{id[0], id[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}
	for _, l := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		if len(l) == 0 || len(l) > 63 {
			return errors.New("bad name")
		}
		q = append(q, byte(len(l)))
		q = append(q, l...)
	}
	q = append(q, 0, 0, 1, 0, 1)
	c, err := net.Dial("udp", server)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(q); err != nil {
		return err
	}
	b := make([]byte, 1500)
	n, err := c.Read(b)
	if err != nil {
		return err
	}
	b = b[:n]
	if n < 12 || b[0] != id[0] || b[1] != id[1] {
		return errors.New("bad reply")
	}
	rcode := b[3] & 0xf
	an := int(binary.BigEndian.Uint16(b[6:8]))
	fmt.Printf("rcode=%d answers=%d\n", rcode, an)
	// Skip the question, then print A records.
	i := 12
	for i < n && b[i] != 0 {
		i += int(b[i]) + 1
	}
	i += 5
	for a := 0; a < an && i+12 <= n; a++ {
		if b[i]&0xc0 == 0xc0 {
			i += 2
		} else {
			for i < n && b[i] != 0 {
				i += int(b[i]) + 1
			}
			i++
		}
		if i+10 > n {
			break
		}
		typ := binary.BigEndian.Uint16(b[i : i+2])
		rdlen := int(binary.BigEndian.Uint16(b[i+8 : i+10]))
		i += 10
		if typ == 1 && rdlen == 4 && i+4 <= n {
			fmt.Println(net.IP(b[i : i+4]).String())
		}
		i += rdlen
	}
	return nil
}
