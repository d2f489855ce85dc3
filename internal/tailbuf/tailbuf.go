// Package tailbuf keeps the end of a stream (a console, a daemon's log, a
// child's stderr) for error messages, in bounded memory.
package tailbuf

import "sync"

// Buffer is an io.Writer that keeps the last max bytes written to it. It is
// safe for concurrent use.
type Buffer struct {
	mu  sync.Mutex
	max int
	b   []byte // guarded by mu; at most max bytes
}

// New returns a Buffer that keeps the last max bytes.
func New(max int) *Buffer { return &Buffer{max: max} }

// Write appends p, dropping the oldest bytes beyond max. It never fails.
func (t *Buffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

// String returns the bytes kept.
func (t *Buffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
