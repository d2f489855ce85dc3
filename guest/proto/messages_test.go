package proto

import (
	"bytes"
	"encoding/json"
	"testing"
)

func TestDecodeOpenHeader(t *testing.T) {
	good := []string{
		`{"kind":"exec","exec":{"argv":["sh"],"env":[]}}`,
		`{"kind":"setup","setup":{"hostname":"h"}}`,
		`{"kind":"read_file","file":{"path":"/etc/passwd"}}`,
		`{"kind":"shutdown"}`,
	}
	for _, s := range good {
		if _, err := DecodeOpenHeader([]byte(s)); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	bad := []string{
		``, `{`, `[]`, `{"kind":"exec"}`, `{"kind":"exec","exec":{"argv":[]}}`,
		`{"kind":"setup"}`, `{"kind":"write_file","file":{"path":""}}`, `{"kind":"nope"}`,
	}
	for _, s := range bad {
		if _, err := DecodeOpenHeader([]byte(s)); err == nil {
			t.Errorf("%q: accepted", s)
		}
	}
}

func TestDecodeStreamMsg(t *testing.T) {
	for _, s := range []string{`{"type":"exit","code":3}`, `{"type":"started","pid":1}`, `{"type":"resize","rows":1,"cols":2}`} {
		if _, err := DecodeStreamMsg([]byte(s)); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	for _, s := range []string{`{"type":"exit","code":256}`, `{"type":"exit","code":-1}`, `{"type":"exit","signal":65}`, `{"type":"x"}`, `nul`} {
		if _, err := DecodeStreamMsg([]byte(s)); err == nil {
			t.Errorf("%q: accepted", s)
		}
	}
}

// FuzzDecodeOpenHeader: any bytes decode or fail cleanly, and what decodes
// re-encodes to something that decodes the same way.
func FuzzDecodeOpenHeader(f *testing.F) {
	f.Add([]byte(`{"kind":"exec","exec":{"argv":["sh","-c","x"],"env":["A=1"],"tty":true,"rows":3}}`))
	f.Add([]byte(`{"kind":"setup","setup":{"entropy":"AAAA","net":{"interface":"eth0"}}}`))
	f.Add([]byte(`{"kind":"list_files","file":{"path":"/"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeOpenHeader(b)
		if err != nil {
			return
		}
		h2, err := DecodeOpenHeader(Encode(h))
		if err != nil {
			t.Fatalf("re-encoded header rejected: %v", err)
		}
		if !bytes.Equal(Encode(h), Encode(h2)) {
			t.Fatal("round trip changed the header")
		}
	})
}

func FuzzDecodeStreamMsg(f *testing.F) {
	f.Add([]byte(`{"type":"exit","code":1,"signal":9}`))
	f.Add([]byte(`{"type":"result","files":[{"name":"a","size":1}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeStreamMsg(b)
		if err != nil {
			return
		}
		if m.Code < 0 || m.Code > 255 || m.Signal < 0 || m.Signal > 64 {
			t.Fatalf("out of range accepted: %+v", m)
		}
		var back StreamMsg
		if err := json.Unmarshal(Encode(m), &back); err != nil {
			t.Fatal(err)
		}
	})
}
