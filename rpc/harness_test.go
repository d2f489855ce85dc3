package rpc

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"sync"
	"testing"
	"time"
)

// tclient drives one Serve session over pipes, like an SDK would: a reader
// goroutine dispatches responses by id and notifications by request_id.
type tclient struct {
	t    testing.TB
	w    *io.PipeWriter
	wmu  sync.Mutex
	done chan error // Serve's result

	mu      sync.Mutex
	next    int
	waiters map[string]chan *tmsg
	notes   map[string]func(*tmsg) // by request_id
	other   chan *tmsg             // null-id errors and unrouted notifications
}

type tmsg struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  *Error          `json:"error"`
}

type noteParams struct {
	RequestID json.RawMessage `json:"request_id"`
	Stream    string          `json:"stream"`
	Data      []byte          `json:"data"`
	ID        string          `json:"id"`
}

func startSession(t testing.TB, cfg Config) *tclient {
	t.Helper()
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	c := &tclient{t: t, w: inW, done: make(chan error, 1),
		waiters: map[string]chan *tmsg{}, notes: map[string]func(*tmsg){}, other: make(chan *tmsg, 1024)}
	go func() {
		err := Serve(context.Background(), inR, outW, cfg)
		outW.Close()
		c.done <- err
	}()
	go c.readLoop(outR)
	t.Cleanup(func() { c.closeInput() })
	return c
}

func (c *tclient) readLoop(r io.Reader) {
	br := bufio.NewReaderSize(r, 1<<20)
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			return
		}
		var m tmsg
		if err := json.Unmarshal(line, &m); err != nil {
			c.t.Errorf("server wrote a bad line %q: %v", line, err)
			continue
		}
		if m.Method != "" {
			var p noteParams
			json.Unmarshal(m.Params, &p)
			c.mu.Lock()
			f := c.notes[string(p.RequestID)]
			c.mu.Unlock()
			if f != nil {
				f(&m)
			} else {
				c.other <- &m
			}
			continue
		}
		c.mu.Lock()
		ch := c.waiters[string(m.ID)]
		delete(c.waiters, string(m.ID))
		delete(c.notes, string(m.ID))
		c.mu.Unlock()
		if ch != nil {
			ch <- &m
		} else {
			c.other <- &m
		}
	}
}

// raw writes one line as is.
func (c *tclient) raw(line string) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := io.WriteString(c.w, line+"\n"); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// start sends a request and returns its id and the channel of its answer.
// onNote, if set, gets the request's notifications in order.
func (c *tclient) start(method string, params any, onNote func(*tmsg)) (string, chan *tmsg) {
	c.mu.Lock()
	c.next++
	n := c.next
	id := strconv.Itoa(n)
	ch := make(chan *tmsg, 1)
	c.waiters[id] = ch
	if onNote != nil {
		c.notes[id] = onNote
	}
	c.mu.Unlock()
	b, err := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": n, "method": method, "params": params})
	if err != nil {
		c.t.Fatal(err)
	}
	c.raw(string(b))
	return id, ch
}

func (c *tclient) notify(method string, params any) {
	b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "method": method, "params": params})
	c.raw(string(b))
}

func (c *tclient) wait(ch chan *tmsg, d time.Duration) *tmsg {
	c.t.Helper()
	select {
	case m := <-ch:
		return m
	case <-time.After(d):
		c.t.Fatalf("no answer in %v", d)
		return nil
	}
}

// call sends a request and waits for its answer.
func (c *tclient) call(method string, params any) (json.RawMessage, *Error) {
	c.t.Helper()
	_, ch := c.start(method, params, nil)
	m := c.wait(ch, 3*time.Minute)
	return m.Result, m.Error
}

// must is call that requires success and decodes the result into out.
func (c *tclient) must(method string, params any, out any) {
	c.t.Helper()
	res, e := c.call(method, params)
	if e != nil {
		c.t.Fatalf("%s: %v", method, e)
	}
	if out != nil {
		if err := json.Unmarshal(res, out); err != nil {
			c.t.Fatalf("%s: result %s: %v", method, res, err)
		}
	}
}

// fails is call that requires an error with the given code.
func (c *tclient) fails(code int, method string, params any) *Error {
	c.t.Helper()
	res, e := c.call(method, params)
	if e == nil {
		c.t.Fatalf("%s: want error %d, got result %s", method, code, res)
	}
	if e.Code != code {
		c.t.Fatalf("%s: want error %d, got %d %q", method, code, e.Code, e.Message)
	}
	return e
}

func (c *tclient) nextOther(d time.Duration) *tmsg {
	c.t.Helper()
	select {
	case m := <-c.other:
		return m
	case <-time.After(d):
		c.t.Fatalf("no unrouted message in %v", d)
		return nil
	}
}

func (c *tclient) closeInput() { c.w.Close() }

// end closes the input and waits for Serve to return.
func (c *tclient) end(d time.Duration) error {
	c.t.Helper()
	c.closeInput()
	select {
	case err := <-c.done:
		return err
	case <-time.After(d):
		c.t.Fatalf("Serve did not return %v after EOF", d)
		return nil
	}
}

type execOut struct {
	ExitCode        int    `json:"exit_code"`
	Signal          int    `json:"signal"`
	DurationMS      int64  `json:"duration_ms"`
	Stdout          []byte `json:"stdout"`
	Stderr          []byte `json:"stderr"`
	StdoutTruncated bool   `json:"stdout_truncated"`
}

// streamed runs a streaming exec method and collects its output.
type streamed struct {
	mu             sync.Mutex
	stdout, stderr []byte
	order          []string
}

func (s *streamed) note(m *tmsg) {
	var p noteParams
	json.Unmarshal(m.Params, &p)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.order = append(s.order, m.Method)
	switch p.Stream {
	case "stdout":
		s.stdout = append(s.stdout, p.Data...)
	case "stderr":
		s.stderr = append(s.stderr, p.Data...)
	default:
		s.stdout = append(s.stdout, p.Data...) // read_file_chunk
	}
}

func (s *streamed) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("stdout %q stderr %q", s.stdout, s.stderr)
}
