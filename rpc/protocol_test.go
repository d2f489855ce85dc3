package rpc

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"matchlock.dev/matchlock/sandbox"
)

// The fast tier: the protocol, limits and lifecycles against fakeSandbox.

func fakeSession(t *testing.T, mod func(*Config)) (*tclient, *fakeRegistry) {
	reg := &fakeRegistry{}
	cfg := Config{NewSandbox: reg.new, Images: noImages{}}
	if mod != nil {
		mod(&cfg)
	}
	return startSession(t, cfg), reg
}

func create(t *testing.T, c *tclient, params map[string]any) string {
	t.Helper()
	if params == nil {
		params = map[string]any{}
	}
	if params["image"] == nil {
		params["image"] = "busybox:latest"
	}
	var res struct {
		ID              string `json:"id"`
		ProtocolVersion int    `json:"protocol_version"`
	}
	c.must("create", params, &res)
	if res.ID == "" || res.ProtocolVersion != ProtocolVersion {
		t.Fatalf("create: %+v", res)
	}
	return res.ID
}

func TestMalformedInput(t *testing.T) {
	c, _ := fakeSession(t, func(cfg *Config) { cfg.MaxLine = 1024 })
	cases := []struct {
		line string
		code int
		id   string
	}{
		{`this is not json`, CodeParseError, "null"},
		{`{"jsonrpc":"2.0","id":1,"method":"ping"`, CodeParseError, "null"},
		{`[{"jsonrpc":"2.0","id":1,"method":"ping"}]`, CodeInvalidRequest, "null"},
		{`"just a string"`, CodeInvalidRequest, "null"},
		{`{"jsonrpc":"1.0","id":2,"method":"ping"}`, CodeInvalidRequest, "2"},
		{`{"jsonrpc":"2.0","id":3}`, CodeInvalidRequest, "3"},
		{`{"jsonrpc":"2.0","id":4,"method":7}`, CodeInvalidRequest, "4"},
		{`{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}`, CodeInvalidRequest, "null"},
		{`{"jsonrpc":"2.0","id":"x","method":"no_such_method"}`, CodeMethodNotFound, `"x"`},
		{`{"jsonrpc":"2.0","id":5,"method":"create","params":{"imagee":"busybox"}}`, CodeInvalidParams, "5"},
		{`{"jsonrpc":"2.0","id":6,"method":"create","params":[1,2]}`, CodeInvalidParams, "6"},
		{`{"jsonrpc":"2.0","id":7,"method":"create","params":{"image":"b","cpus":"two"}}`, CodeInvalidParams, "7"},
		{`{"jsonrpc":"2.0","id":8,"method":"create","params":{}}`, CodeInvalidParams, "8"},
		{`{"jsonrpc":"2.0","id":9,"method":"exec","params":{"id":"vm-nope","command":"true"}}`, CodeUnknownSandbox, "9"},
		{`{"jsonrpc":"2.0","id":10,"method":"cancel","params":{}}`, CodeInvalidParams, "10"},
		{`{"jsonrpc":"2.0","id":11,"method":"stdin","params":{"request_id":99,"data":"aGk="}}`, CodeUnknownRequest, "11"},
		{`{"jsonrpc":"2.0","id":12,"method":"write_file_chunk","params":{"handle":"wf-9","data":"aGk="}}`, CodeUnknownRequest, "12"},
		{`{"jsonrpc":"2.0","id":13,"method":"stdin","params":{"request_id":1,"data":"!!notbase64"}}`, CodeInvalidParams, "13"},
		{`{"jsonrpc":"2.0","id":14,"method":"ping","params":{"x":1}}`, CodeInvalidParams, "14"},
		{`{"jsonrpc":"2.0","id":15,"method":"ping","params":"` + strings.Repeat("x", 2000) + `"}`, CodeTooLarge, "null"},
	}
	for _, tc := range cases {
		c.raw(tc.line)
		m := c.nextOther(5 * time.Second)
		if m.Error == nil || m.Error.Code != tc.code || string(m.ID) != tc.id {
			t.Errorf("%.60s: got id %s error %+v, want id %s code %d", tc.line, m.ID, m.Error, tc.id, tc.code)
		}
	}
	// Blank lines and notifications of unknown methods get no answer; the
	// session still works.
	c.raw("")
	c.raw("   ")
	c.raw(`{"jsonrpc":"2.0","method":"no_such_method"}`)
	var pong struct {
		ProtocolVersion int `json:"protocol_version"`
	}
	c.must("ping", nil, &pong)
	if pong.ProtocolVersion != ProtocolVersion {
		t.Fatalf("ping: %+v", pong)
	}
	select {
	case m := <-c.other:
		t.Fatalf("unexpected message %+v", m)
	default:
	}
	if err := c.end(5 * time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestCreateValidation(t *testing.T) {
	c, reg := fakeSession(t, nil)
	for _, m := range []map[string]any{
		{"guest_path": "/w"},
		{"guest_path": "w", "host_path": "/tmp"},
		{"guest_path": "/w", "host_path": "tmp"},
		{"guest_path": "/w", "host_path": "/tmp", "volume": "v"},
		{"guest_path": "/w", "host_path": "/tmp", "mode": "rwx"},
		{"guest_path": "/w", "host_path": "/tmp", "mode": "rw", "readonly": true},
		{"guest_path": "/w", "volume": "v", "mode": "overlay"},
		{"guest_path": "/w", "host_path": "/tmp", "type": "bind"},
	} {
		c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "mounts": []any{m}})
	}
	c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "cpus": 65})
	c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "memory_mib": 10})
	c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "hostname": "bad name"})
	c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "no_network": true, "allow_hosts": []string{"x.com"}})
	c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "secrets": []any{map[string]any{"name": "1BAD", "value": "v"}}})
	c.fails(CodeInvalidParams, "create", map[string]any{"image": "b", "env": map[string]string{"A=B": "c"}})
	e := c.fails(CodeSandboxError, "create", map[string]any{"image": "missing:latest"})
	if !strings.Contains(e.Message, "not found") {
		t.Fatalf("missing image: %q", e.Message)
	}
	id := create(t, c, map[string]any{
		"image": "alpine:latest", "cpus": 2, "memory_mib": 256, "disk_size_mib": 64, "hostname": "box",
		"allow_hosts": []string{"api.example.com"}, "allow_private": []string{"10.0.0.1"},
		"secrets": []any{map[string]any{"name": "API_KEY", "value": "s3cret", "hosts": []string{"api.example.com"}}},
		"mounts": []any{
			map[string]any{"guest_path": "/src", "host_path": "/tmp", "readonly": true},
			map[string]any{"guest_path": "/scratch", "host_path": "/var/tmp", "mode": "overlay", "owner": "1000"},
			map[string]any{"guest_path": "/data", "volume": "cache", "readonly": true},
		},
	})
	o := reg.get(id).opts
	if len(o.Mounts) != 2 || o.Mounts[0] != (sandbox.Mount{Source: "/tmp", Target: "/src", Mode: "ro"}) ||
		o.Mounts[1] != (sandbox.Mount{Source: "/var/tmp", Target: "/scratch", Mode: "overlay", Owner: "1000"}) ||
		len(o.Volumes) != 1 || o.Volumes[0] != (sandbox.VolumeMount{Name: "cache", Target: "/data", ReadOnly: true}) {
		t.Fatalf("mounts not passed through: %+v %+v", o.Mounts, o.Volumes)
	}
	if o.Image != "alpine:latest" || o.CPUs != 2 || o.MemoryMiB != 256 || o.DiskSizeMiB != 64 || o.Hostname != "box" ||
		len(o.AllowHosts) != 1 || len(o.AllowPrivate) != 1 || len(o.Secrets) != 1 || o.Secrets[0].Value != "s3cret" ||
		o.Secrets[0].Hosts[0] != "api.example.com" {
		t.Fatalf("options not passed through: %+v", o)
	}
	c.fails(CodeNotSupported, "allow_list_add", map[string]any{"id": id, "hosts": []string{"x.com"}})
	c.fails(CodeNotSupported, "allow_list_delete", map[string]any{"id": id, "hosts": []string{"x.com"}})
	c.fails(CodeNotSupported, "port_forward", map[string]any{"id": id, "guest_port": 8080})
	c.fails(CodeInvalidParams, "port_forward", map[string]any{"id": id, "guest_port": 0})
}

func TestExecFake(t *testing.T) {
	c, _ := fakeSession(t, nil)
	id := create(t, c, map[string]any{"env": map[string]string{"FROM_CREATE": "1", "BOTH": "create"}, "workdir": "/work", "user": "nobody"})

	var r execOut
	c.must("exec", map[string]any{"id": id, "command": "echo hello world"}, &r)
	if string(r.Stdout) != "hello world\n" || r.ExitCode != 0 {
		t.Fatalf("echo: %+v", r)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"exit", "3"}}, &r)
	if r.ExitCode != 3 || string(r.Stderr) != "bye\n" || len(r.Stdout) != 0 {
		t.Fatalf("exit 3: %+v", r)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"env"}, "env": map[string]string{"BOTH": "exec"}}, &r)
	env := string(r.Stdout)
	for _, want := range []string{"PATH=/bin\n", "FROM_IMAGE=1\n", "FROM_CREATE=1\n", "BOTH=exec\n"} {
		if !strings.Contains(env, want) {
			t.Errorf("env lacks %q: %q", want, env)
		}
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"pwd"}}, &r)
	if string(r.Stdout) != "/work nobody\n" {
		t.Fatalf("defaults from create: %q", r.Stdout)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"pwd"}, "workdir": "/x", "user": "1000"}, &r)
	if string(r.Stdout) != "/x 1000\n" {
		t.Fatalf("per-exec overrides: %q", r.Stdout)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"cat"}, "stdin": []byte("fed in")}, &r)
	if string(r.Stdout) != "fed in" {
		t.Fatalf("exec stdin: %q", r.Stdout)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"spew", "5000000"}}, &r)
	if len(r.Stdout) != maxBufferedOutput || !r.StdoutTruncated {
		t.Fatalf("cap: %d bytes, truncated %v", len(r.Stdout), r.StdoutTruncated)
	}
	c.fails(CodeNotFound, "exec", map[string]any{"id": id, "argv": []string{"nosuchprogram"}})
	c.fails(CodeInvalidParams, "exec", map[string]any{"id": id, "argv": []string{"echo"}, "command": "echo"})
	c.fails(CodeInvalidParams, "exec", map[string]any{"id": id})
	c.fails(CodeInvalidParams, "exec", map[string]any{"id": id, "command": "echo", "rows": 3})
	c.fails(CodeInvalidParams, "exec_pipe", map[string]any{"id": id, "command": "cat", "stdin": []byte("x")})

	// exec_stream: all output notifications come before the result.
	var out streamed
	_, ch := c.start("exec_stream", map[string]any{"id": id, "command": "spew 300000"}, out.note)
	m := c.wait(ch, 10*time.Second)
	json.Unmarshal(m.Result, &r)
	if m.Error != nil || r.ExitCode != 0 || len(out.stdout) != 300000 || len(out.order) < 5 {
		t.Fatalf("exec_stream: %v %+v, %d bytes in %d notes", m.Error, r, len(out.stdout), len(out.order))
	}
	for _, meth := range out.order {
		if meth != "exec_output" {
			t.Fatalf("notification %q", meth)
		}
	}
}

func TestExecPipeFake(t *testing.T) {
	c, _ := fakeSession(t, nil)
	id := create(t, c, nil)
	var out streamed
	rid, ch := c.start("exec_pipe", map[string]any{"id": id, "argv": []string{"cat"}}, out.note)
	// Sent at once, before the process can have started: nothing is lost
	// and order is kept, with requests and notifications mixed.
	var want bytes.Buffer
	var answers []chan *tmsg
	for i := 0; i < 10; i++ {
		chunk := bytes.Repeat([]byte{byte('a' + i)}, 1000+i)
		want.Write(chunk)
		if i%2 == 0 {
			c.notify("stdin", map[string]any{"request_id": json.RawMessage(rid), "data": chunk})
		} else {
			_, a := c.start("stdin", map[string]any{"request_id": json.RawMessage(rid), "data": chunk}, nil)
			answers = append(answers, a)
		}
	}
	_, eof := c.start("stdin", map[string]any{"request_id": json.RawMessage(rid), "eof": true}, nil)
	for _, a := range append(answers, eof) {
		if m := c.wait(a, 5*time.Second); m.Error != nil {
			t.Fatalf("stdin: %v", m.Error)
		}
	}
	m := c.wait(ch, 10*time.Second)
	if m.Error != nil || !bytes.Equal(out.stdout, want.Bytes()) {
		t.Fatalf("exec_pipe: %v; got %d bytes, want %d", m.Error, len(out.stdout), want.Len())
	}
	// The exec is over: its stdin is gone.
	c.fails(CodeUnknownRequest, "stdin", map[string]any{"request_id": json.RawMessage(rid), "data": []byte("late")})
}

func TestExecTTYFake(t *testing.T) {
	c, _ := fakeSession(t, nil)
	id := create(t, c, nil)
	var r execOut
	var out streamed
	_, ch := c.start("exec_tty", map[string]any{"id": id, "argv": []string{"env"}, "rows": 24, "cols": 80}, out.note)
	m := c.wait(ch, 5*time.Second)
	json.Unmarshal(m.Result, &r)
	if m.Error != nil || !strings.Contains(string(out.stdout), "TTY=24x80") || !strings.Contains(string(out.stdout), "TERM=xterm") {
		t.Fatalf("exec_tty: %v %s", m.Error, &out)
	}

	var out2 streamed
	rid, ch := c.start("exec_tty", map[string]any{"id": id, "argv": []string{"sleep"}}, out2.note)
	c.must("resize", map[string]any{"request_id": json.RawMessage(rid), "rows": 40, "cols": 100}, nil)
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(out2.String(), "size 40 100") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	c.must("resize", map[string]any{"request_id": json.RawMessage(rid), "rows": 50, "cols": 132}, nil)
	for !strings.Contains(out2.String(), "size 50 132") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(out2.String(), "size 50 132") {
		t.Fatalf("resize not applied: %s", &out2)
	}
	c.fails(CodeInvalidParams, "resize", map[string]any{"request_id": json.RawMessage(rid), "rows": 0, "cols": 100})
	c.fails(CodeInvalidParams, "signal", map[string]any{"request_id": json.RawMessage(rid), "signal": "NOPE"})
	c.must("signal", map[string]any{"request_id": json.RawMessage(rid), "signal": "SIGTERM"}, nil)
	m = c.wait(ch, 5*time.Second)
	json.Unmarshal(m.Result, &r)
	if m.Error != nil || r.ExitCode != 143 || r.Signal != 15 {
		t.Fatalf("after SIGTERM: %v %+v", m.Error, r)
	}
	c.fails(CodeUnknownRequest, "resize", map[string]any{"request_id": json.RawMessage(rid), "rows": 1, "cols": 1})
}

func TestCancelFake(t *testing.T) {
	c, reg := fakeSession(t, nil)
	id := create(t, c, nil)
	rid, ch := c.start("exec", map[string]any{"id": id, "argv": []string{"sleep"}}, nil)
	waitRunning(t, reg.get(id), 1)
	var res struct{ Cancelled bool }
	c.must("cancel", map[string]any{"request_id": json.RawMessage(rid)}, &res)
	if !res.Cancelled {
		t.Fatal("cancel: not found")
	}
	m := c.wait(ch, 5*time.Second)
	if m.Error == nil || m.Error.Code != CodeCancelled {
		t.Fatalf("cancelled exec: %+v", m)
	}
	waitRunning(t, reg.get(id), 0)
	c.must("cancel", map[string]any{"request_id": json.RawMessage(rid)}, &res)
	if res.Cancelled {
		t.Fatal("cancel of a finished request reported true")
	}
	// Cancelling a create that is still booting.
	rid, ch = c.start("create", map[string]any{"image": "slow:latest"}, nil)
	time.Sleep(50 * time.Millisecond)
	c.notify("cancel", map[string]any{"request_id": json.RawMessage(rid)})
	if m := c.wait(ch, 5*time.Second); m.Error == nil || m.Error.Code != CodeCancelled {
		t.Fatalf("cancelled create: %+v", m)
	}
	// A duplicate in-flight id is refused.
	c.raw(`{"jsonrpc":"2.0","id":"dup","method":"exec","params":{"id":"` + id + `","argv":["sleep"]}}`)
	time.Sleep(50 * time.Millisecond)
	c.raw(`{"jsonrpc":"2.0","id":"dup","method":"ping"}`)
	if m := c.nextOther(5 * time.Second); m.Error == nil || m.Error.Code != CodeInvalidRequest {
		t.Fatalf("duplicate id: %+v", m)
	}
	c.notify("cancel", map[string]any{"request_id": "dup"})
	if m := c.nextOther(5 * time.Second); m.Error == nil || m.Error.Code != CodeCancelled {
		t.Fatalf("cancelled dup: %+v", m)
	}
}

func waitRunning(t *testing.T, f *fakeSandbox, n int32) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for f.running.Load() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d processes running, want %d", f.running.Load(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLimitsFake(t *testing.T) {
	c, reg := fakeSession(t, func(cfg *Config) {
		cfg.MaxSandboxes, cfg.MaxInFlight, cfg.MaxBacklogBytes, cfg.MaxHandles = 2, 3, 10000, 1
	})
	a := create(t, c, nil)
	create(t, c, nil)
	c.fails(CodeLimit, "create", map[string]any{"image": "b"})

	// In-flight: two sleeping execs and a pipe fill the three slots.
	c.start("exec", map[string]any{"id": a, "argv": []string{"sleep"}}, nil)
	c.start("exec", map[string]any{"id": a, "argv": []string{"sleep"}}, nil)
	rid, pipeCh := c.start("exec_pipe", map[string]any{"id": a, "argv": []string{"sleep"}}, nil)
	waitRunning(t, reg.get(a), 3)
	c.fails(CodeLimit, "exec", map[string]any{"id": a, "argv": []string{"echo"}})
	c.must("ping", nil, nil) // inline methods still work

	// Backlog: the process does not read stdin, so chunks queue up until
	// the session's byte budget refuses them.
	var refused *Error
	var answers []chan *tmsg
	for i := 0; i < 40 && refused == nil; i++ {
		_, ch := c.start("stdin", map[string]any{"request_id": json.RawMessage(rid), "data": make([]byte, 1000)}, nil)
		select {
		case m := <-ch:
			if m.Error != nil {
				refused = m.Error
			}
		case <-time.After(20 * time.Millisecond):
			answers = append(answers, ch)
		}
	}
	if refused == nil || refused.Code != CodeLimit {
		t.Fatalf("backlog never refused: %+v", refused)
	}
	// Closing the sandbox fails everything queued and in flight.
	c.must("close", map[string]any{"id": a}, nil)
	for _, ch := range answers {
		if m := c.wait(ch, 5*time.Second); m.Error == nil {
			t.Fatalf("queued stdin after close: %+v", m)
		}
	}
	if m := c.wait(pipeCh, 5*time.Second); m.Error == nil || m.Error.Code != CodeSandboxClosed {
		t.Fatalf("exec_pipe after close: %+v", m.Error)
	}
	b := create(t, c, nil) // the slot is free again
	var h struct{ Handle string }
	c.must("write_file_open", map[string]any{"id": b, "path": "/f"}, &h)
	c.fails(CodeLimit, "write_file_open", map[string]any{"id": b, "path": "/g"})
}

func TestFilesFake(t *testing.T) {
	c, _ := fakeSession(t, nil)
	id := create(t, c, nil)
	var h struct{ Handle string }
	c.must("write_file_open", map[string]any{"id": id, "path": "/tmp/f", "mode": 0o600}, &h)
	var want bytes.Buffer
	for i := 0; i < 5; i++ {
		chunk := bytes.Repeat([]byte{byte('0' + i)}, 100000)
		want.Write(chunk)
		c.must("write_file_chunk", map[string]any{"handle": h.Handle, "data": chunk}, nil)
	}
	var closed struct {
		Size   int64
		SHA256 string
	}
	c.must("write_file_close", map[string]any{"handle": h.Handle}, &closed)
	sum := sha256.Sum256(want.Bytes())
	if closed.Size != int64(want.Len()) || closed.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("close: %+v", closed)
	}
	c.fails(CodeUnknownRequest, "write_file_chunk", map[string]any{"handle": h.Handle, "data": []byte("x")})

	var out streamed
	_, ch := c.start("read_file", map[string]any{"id": id, "path": "/tmp/f"}, out.note)
	m := c.wait(ch, 5*time.Second)
	var rr struct {
		Size   int64
		SHA256 string
	}
	json.Unmarshal(m.Result, &rr)
	if m.Error != nil || !bytes.Equal(out.stdout, want.Bytes()) || rr.SHA256 != closed.SHA256 || len(out.order) < 2 {
		t.Fatalf("read_file: %v %+v, %d bytes in %d chunks", m.Error, rr, len(out.stdout), len(out.order))
	}
	c.fails(CodeNotFound, "read_file", map[string]any{"id": id, "path": "/nope"})
	c.fails(CodeInvalidParams, "read_file", map[string]any{"id": id, "path": "relative"})

	var ls struct {
		Files []struct {
			Name string
			Size int64
		}
	}
	c.must("list_files", map[string]any{"id": id, "path": "/tmp"}, &ls)
	if len(ls.Files) != 1 || ls.Files[0].Name != "f" || ls.Files[0].Size != int64(want.Len()) {
		t.Fatalf("list_files: %+v", ls)
	}

	// A guest refusal surfaces at close with its code.
	c.must("write_file_open", map[string]any{"id": id, "path": "/ro/x"}, &h)
	c.must("write_file_chunk", map[string]any{"handle": h.Handle, "data": []byte("x")}, nil)
	c.fails(CodePermission, "write_file_close", map[string]any{"handle": h.Handle})
	// Abort.
	c.must("write_file_open", map[string]any{"id": id, "path": "/tmp/g"}, &h)
	c.must("write_file_close", map[string]any{"handle": h.Handle, "abort": true}, nil)
	c.fails(CodeUnknownRequest, "write_file_close", map[string]any{"handle": h.Handle})
}

func TestSandboxLifecycleFake(t *testing.T) {
	c, reg := fakeSession(t, nil)
	a := create(t, c, nil)
	b := create(t, c, nil)
	_, ch := c.start("exec", map[string]any{"id": b, "argv": []string{"sleep"}}, nil)
	waitRunning(t, reg.get(b), 1)
	reg.get(b).crash()
	if m := c.wait(ch, 5*time.Second); m.Error == nil || m.Error.Code != CodeSandboxClosed {
		t.Fatalf("exec on a crashed VM: %+v", m)
	}
	m := c.nextOther(5 * time.Second)
	var p noteParams
	json.Unmarshal(m.Params, &p)
	if m.Method != "sandbox_exited" || p.ID != b {
		t.Fatalf("want sandbox_exited for %s, got %+v", b, m)
	}
	c.fails(CodeUnknownSandbox, "exec", map[string]any{"id": b, "argv": []string{"echo"}})
	c.must("exec", map[string]any{"id": a, "argv": []string{"echo"}}, nil)
	c.must("close", map[string]any{"id": a}, nil)
	c.fails(CodeUnknownSandbox, "close", map[string]any{"id": a})

	// EOF closes every sandbox, in flight or not.
	x := create(t, c, nil)
	y := create(t, c, nil)
	_, ch = c.start("exec", map[string]any{"id": x, "argv": []string{"sleep"}}, nil)
	waitRunning(t, reg.get(x), 1)
	if err := c.end(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{x, y} {
		select {
		case <-reg.get(id).done:
		default:
			t.Fatalf("%s not closed at EOF", id)
		}
	}
	if m := c.wait(ch, time.Second); m.Error == nil || m.Error.Code != CodeSessionEnded {
		t.Fatalf("exec at EOF: %+v", m)
	}
}

// fakeRegistry records the fakes a session creates.
type fakeRegistry struct {
	mu  sync.Mutex
	all map[string]*fakeSandbox
}

func (r *fakeRegistry) new(ctx contextT, o optionsT) (Sandbox, error) {
	sb, err := newFake(ctx, o)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.all == nil {
		r.all = map[string]*fakeSandbox{}
	}
	r.all[sb.ID()] = sb.(*fakeSandbox)
	return sb, nil
}

func (r *fakeRegistry) get(id string) *fakeSandbox {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.all[id]
}
