package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"matchlock.dev/matchlock/netstack/policy"
)

// decision is what the policy said about one TCP destination.
type decision struct {
	name   string     // connect to this name ("" for by-address)
	ip     netip.Addr // or to this address
	reason string     // why not, when denied
}

// decide applies the policy to a guest TCP destination (not the gateway or
// the guest subnet, which handleTCP refuses first).
func (st *Stack) decide(dst netip.Addr, port uint16) (decision, bool) {
	if policy.SyntheticPrefix.Contains(dst) {
		name, ok := st.alloc.Lookup(dst)
		if !ok {
			return decision{reason: "unknown synthetic address (resolve the name first)"}, false
		}
		if !st.pol.AllowName(name, port) {
			return decision{name: name, reason: "name not allowed on this port"}, false
		}
		return decision{name: name}, true
	}
	if !st.pol.AllowIP(dst, port) {
		return decision{ip: dst, reason: "address not allowed (connect by an allowed name)"}, false
	}
	if policy.IsPrivate(dst) && !st.pol.PrivateAllowed("", dst, port) {
		return decision{ip: dst, reason: "private address (see --allow-private)"}, false
	}
	return decision{ip: dst}, true
}

// handleTCP runs, in its own goroutine, for each new guest SYN the forwarder
// accepted (at most MaxInFlight at once).
func (st *Stack) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	src := toNetip(id.RemoteAddress)
	dst := toNetip(id.LocalAddress)
	port := id.LocalPort
	ev := Event{Proto: "tcp", IP: dst, Port: port}
	deny := func(reason string) {
		st.connsDenied.Add(1)
		ev.Verdict, ev.Reason = Deny, reason
		st.log(ev)
		r.Complete(true) // RST
	}
	switch {
	case st.ctx.Err() != nil:
		r.Complete(true)
		return
	case src != GuestIP:
		deny("source is not the guest")
		return
	case port == 0:
		deny("port 0")
		return
	case dst == GatewayIP && port == DNSPort:
		st.serveDNSTCP(r)
		return
	case dst == GatewayIP:
		deny("gateway port not served (only DNS on 53)")
		return
	case Subnet.Contains(dst):
		deny("sandbox network address")
		return
	}

	dec, ok := st.decide(dst, port)
	ev.Name = dec.name
	if !ok {
		deny(dec.reason)
		return
	}
	if !st.acquireConn() {
		deny(fmt.Sprintf("too many connections (%d)", MaxConns))
		return
	}
	released := false
	release := func() {
		if !released {
			released = true
			st.releaseConn()
		}
	}
	defer release()

	// Dial before completing the guest's handshake: on failure the guest
	// gets a reset, never an open connection to nowhere.
	ctx, cancel := context.WithTimeout(st.ctx, st.cfg.DialTimeout)
	up, upAddr, err := st.dialUpstream(ctx, dec, port)
	cancel()
	ev.Upstream = upAddr
	if err != nil {
		deny(err.Error())
		return
	}
	var wq waiter.Queue
	gep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		up.Close()
		r.Complete(true)
		st.connsDenied.Add(1)
		ev.Verdict, ev.Reason = Deny, "guest handshake failed: "+terr.String()
		st.log(ev)
		return
	}
	r.Complete(false)
	st.connsAllowed.Add(1)
	ev.Verdict = Allow
	st.log(ev)

	guest := gonet.NewTCPConn(&wq, gep)
	if st.goTracked(func() {
		defer st.releaseConn()
		st.serve(guest, gep, up, dec, port, ev)
	}) {
		released = true // the goroutine releases the slot
		return
	}
	gep.Abort()
	up.Close()
}

// goTracked runs f in a goroutine Close waits for, unless Close started.
func (st *Stack) goTracked(f func()) bool {
	st.trackMu.Lock()
	defer st.trackMu.Unlock()
	if st.closing {
		return false
	}
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		f()
	}()
	return true
}

func (st *Stack) acquireConn() bool {
	select {
	case st.conns <- struct{}{}:
		st.connsOpen.Add(1)
		return true
	default:
		return false
	}
}

func (st *Stack) releaseConn() {
	<-st.conns
	st.connsOpen.Add(-1)
}

// serveDNSTCP answers DNS over TCP on the gateway.
func (st *Stack) serveDNSTCP(r *tcp.ForwarderRequest) {
	if !st.acquireConn() {
		r.Complete(true)
		st.connsDenied.Add(1)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		st.releaseConn()
		return
	}
	r.Complete(false)
	c := gonet.NewTCPConn(&wq, ep)
	if !st.goTracked(func() {
		defer st.releaseConn()
		st.responder.ServeConn(st.ctx, c)
	}) {
		ep.Abort()
		st.releaseConn()
	}
}

// dialUpstream dials the decided destination. For a name it resolves the
// name on the host, drops private addresses the policy does not name, and
// dials the rest (IPv4 first) by number.
func (st *Stack) dialUpstream(ctx context.Context, dec decision, port uint16) (net.Conn, netip.AddrPort, error) {
	if dec.name == "" {
		ap := netip.AddrPortFrom(dec.ip, port)
		c, err := st.dial(ctx, "tcp", ap.String())
		if err != nil {
			return nil, ap, fmt.Errorf("dial %s: %w", ap, err)
		}
		return c, ap, nil
	}
	addrs, err := st.resolver.LookupNetIP(ctx, "ip", dec.name)
	if err != nil {
		return nil, netip.AddrPort{}, fmt.Errorf("resolve %s: %w", dec.name, err)
	}
	var cands []netip.Addr
	privateSkipped := false
	for _, a := range addrs {
		a = a.Unmap()
		if !a.IsValid() || a.Zone() != "" {
			continue
		}
		if policy.IsPrivate(a) && !st.pol.PrivateAllowed(dec.name, a, port) {
			privateSkipped = true
			continue
		}
		cands = append(cands, a)
	}
	if len(cands) == 0 {
		if privateSkipped {
			return nil, netip.AddrPort{}, fmt.Errorf("%s resolves only to private addresses (see --allow-private)", dec.name)
		}
		return nil, netip.AddrPort{}, fmt.Errorf("%s has no addresses", dec.name)
	}
	sort.SliceStable(cands, func(i, j int) bool { return cands[i].Is4() && !cands[j].Is4() })
	var firstErr error
	for _, a := range cands {
		ap := netip.AddrPortFrom(a, port)
		c, err := st.dial(ctx, "tcp", ap.String())
		if err == nil {
			return c, ap, nil
		}
		if firstErr == nil {
			firstErr = fmt.Errorf("dial %s (%s): %w", dec.name, ap, err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, netip.AddrPort{}, firstErr
}

// serve runs an established connection: inspection, interceptor, splice.
func (st *Stack) serve(guest *gonet.TCPConn, gep tcpip.Endpoint, up net.Conn, dec decision, port uint16, ev Event) {
	var upOnce sync.Once
	closeUp := func() { upOnce.Do(func() { up.Close() }) }
	stop := context.AfterFunc(st.ctx, func() { gep.Abort(); closeUp() })
	defer stop()

	var first []byte // guest bytes read by the inspection, forwarded first
	var err error
	var down firstRead // upstream bytes read before the down copy started
	inspected := false
	if dec.name != "" && st.cfg.Interceptor != nil {
		var handled bool
		var wait func() ([]byte, error)
		first, err, down, wait, handled = st.offer(guest, up, dec, port)
		if handled {
			ev.Closed, ev.Reason = true, "intercepted"
			st.log(ev)
			return
		}
		if wait != nil {
			// The server spoke first: start the down copy now, then
			// wait for the inspection.
			done := st.startDown(guest, gep, up, down)
			first, err = wait()
			st.finishServe(guest, gep, up, closeUp, first, err, done, ev)
			return
		}
		inspected = true
	}
	done := st.startDown(guest, gep, up, down)
	if !inspected && dec.name != "" {
		first, err = inspectWithDeadline(guest, dec.name)
	}
	st.finishServe(guest, gep, up, closeUp, first, err, done, ev)
}

// firstRead is what one upstream read returned before the down copy.
type firstRead struct {
	b   []byte
	err error
}

// downCopy is the upstream → guest half of a connection.
type downCopy struct {
	done  chan struct{}
	bytes atomic.Int64
}

// startDown copies upstream → guest, after the bytes in pre.
func (st *Stack) startDown(guest *gonet.TCPConn, gep tcpip.Endpoint, up net.Conn, pre firstRead) *downCopy {
	d := &downCopy{done: make(chan struct{})}
	go func() {
		defer close(d.done)
		if len(pre.b) > 0 {
			n, err := guest.Write(pre.b)
			d.bytes.Add(int64(n))
			if err != nil {
				gep.Abort()
				return
			}
		}
		err := pre.err
		if err == nil {
			var n int64
			n, err = copyBuf(guest, up)
			d.bytes.Add(n)
		} else if errors.Is(err, io.EOF) {
			err = nil
		}
		if err != nil {
			gep.Abort()
			return
		}
		guest.CloseWrite()
	}()
	return d
}

// offer inspects the guest's first bytes while watching whether the server
// speaks first, and offers the connection to the interceptor when the guest
// spoke first. It returns the inspection's result (first, err), what the
// upstream sent meanwhile (down), or, when the server spoke first, wait for
// the inspection still running; handled when the interceptor took the flow.
func (st *Stack) offer(guest *gonet.TCPConn, up net.Conn, dec decision, port uint16) (first []byte, err error, down firstRead, wait func() ([]byte, error), handled bool) {
	type inspResult struct {
		b   []byte
		err error
	}
	insp := make(chan inspResult, 1)
	go func() {
		b, err := inspectWithDeadline(guest, dec.name)
		insp <- inspResult{b, err}
	}()
	upFirst := make(chan firstRead, 1)
	go func() {
		b := make([]byte, 4096)
		n, err := up.Read(b)
		upFirst <- firstRead{b[:n], err}
	}()
	select {
	case u := <-upFirst:
		return nil, nil, u, func() ([]byte, error) { r := <-insp; return r.b, r.err }, false
	case r := <-insp:
		// Stop the pending upstream read to take the connection over.
		up.SetReadDeadline(time.Now())
		u := <-upFirst
		up.SetReadDeadline(time.Time{})
		if errors.Is(u.err, os.ErrDeadlineExceeded) {
			u.err = nil
		}
		if r.err != nil || len(u.b) > 0 || u.err != nil {
			return r.b, r.err, u, nil, false
		}
		var upTaken atomic.Bool
		f := &Flow{
			Name:   dec.name,
			Port:   port,
			Kind:   classify(r.b),
			Prefix: r.b,
			Guest:  &prefixConn{Conn: guest, pre: r.b},
			Dial: func(ctx context.Context) (net.Conn, error) {
				if upTaken.CompareAndSwap(false, true) {
					return up, nil
				}
				if !st.pol.AllowName(dec.name, port) {
					return nil, errors.New("name no longer allowed")
				}
				ctx, cancel := context.WithTimeout(ctx, st.cfg.DialTimeout)
				defer cancel()
				c, _, err := st.dialUpstream(ctx, dec, port)
				return c, err
			},
		}
		if st.cfg.Interceptor(st.ctx, f) {
			if !upTaken.Load() {
				up.Close()
			}
			return nil, nil, firstRead{}, nil, true
		}
		return r.b, nil, firstRead{}, nil, false
	}
}

// classify names what the inspected first bytes of a connection are.
func classify(b []byte) string {
	c := firstNonEOL(b)
	switch {
	case len(b) > 5 && b[0] == 0x16 && b[1] == 3:
		return "tls"
	case isAlpha(c):
		return "http"
	}
	return ""
}

// prefixConn returns pre before reading from Conn.
type prefixConn struct {
	net.Conn
	pre []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// finishServe forwards the inspected bytes and the rest of the guest's
// stream upstream (or resets both sides when the inspection refused), waits
// for the down copy and logs the close.
func (st *Stack) finishServe(guest *gonet.TCPConn, gep tcpip.Endpoint, up net.Conn, closeUp func(), first []byte, err error, down *downCopy, ev Event) {
	if err != nil {
		resetUp(up)
		gep.Abort()
		closeUp()
		<-down.done
		ev.Verdict, ev.Reason, ev.Closed = Deny, err.Error(), true
		st.connsDenied.Add(1)
		st.log(ev)
		guest.Close()
		return
	}
	var upBytes int64
	upErr := error(nil)
	if len(first) > 0 {
		var n int
		n, upErr = up.Write(first)
		upBytes += int64(n)
	}
	if upErr == nil {
		var n int64
		n, upErr = copyBuf(up, guest)
		upBytes += n
	}
	if upErr != nil {
		resetUp(up)
		closeUp()
		gep.Abort()
	} else if cw, ok := up.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		closeUp()
	}
	<-down.done
	closeUp()
	guest.Close()
	ev.Closed = true
	ev.BytesUp, ev.BytesDown = upBytes, down.bytes.Load()
	st.log(ev)
}

func inspectWithDeadline(guest *gonet.TCPConn, name string) ([]byte, error) {
	// No deadline until the first byte (the server may speak first); then
	// InspectTimeout for the rest of the hello or head.
	r := &deadlineOnFirstByte{c: guest, d: InspectTimeout}
	b, err := inspect(r, name)
	guest.SetReadDeadline(time.Time{})
	return b, err
}

type deadlineOnFirstByte struct {
	c   *gonet.TCPConn
	d   time.Duration
	set bool
}

func (r *deadlineOnFirstByte) Read(p []byte) (int, error) {
	n, err := r.c.Read(p)
	if n > 0 && !r.set {
		r.set = true
		r.c.SetReadDeadline(time.Now().Add(r.d))
	}
	return n, err
}

func resetUp(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// copyBuf copies until EOF (nil error) or an error.
func copyBuf(dst io.Writer, src io.Reader) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return total, nil
			}
			return total, rerr
		}
	}
}
