package proto

// ring is a byte FIFO whose storage grows on demand up to a hard limit (the
// receive window), so that the memory a stream channel holds is bounded by
// the bytes actually buffered, never by the number of frames that carried
// them. The zero value is empty and ready to use. Not safe for concurrent
// use (the owner's lock guards it).
type ring struct {
	buf  []byte
	head int // index of the first buffered byte
	n    int // buffered bytes
}

func (b *ring) Len() int { return b.n }

// write appends p. The caller guarantees b.Len()+len(p) <= limit; the
// storage never grows past limit.
func (b *ring) write(p []byte, limit int) {
	if len(p) == 0 {
		return
	}
	need := b.n + len(p)
	if need > len(b.buf) {
		size := max(2*len(b.buf), 4<<10, need)
		size = min(size, max(limit, need))
		nb := make([]byte, size)
		b.read(nb) // linearise: empties b, head 0
		b.buf, b.n = nb, need-len(p)
	}
	tail := (b.head + b.n) % len(b.buf)
	c := copy(b.buf[tail:], p)
	copy(b.buf, p[c:])
	b.n += len(p)
}

// read moves up to len(p) bytes into p.
func (b *ring) read(p []byte) int {
	if b.n == 0 {
		return 0
	}
	n := min(len(p), b.n)
	end := b.head + n
	if end <= len(b.buf) {
		copy(p, b.buf[b.head:end])
	} else {
		c := copy(p, b.buf[b.head:])
		copy(p[c:n], b.buf)
	}
	b.head = end % len(b.buf)
	b.n -= n
	if b.n == 0 {
		b.head = 0
	}
	return n
}

// release drops the storage.
func (b *ring) release() { *b = ring{} }

// event is a broadcast condition usable in select: waiters take wait()'s
// channel, signal() wakes all of them. A channel is only allocated when
// somebody waits. Both methods must be called with the owner's lock held.
type event struct{ ch chan struct{} }

func (e *event) wait() <-chan struct{} {
	if e.ch == nil {
		e.ch = make(chan struct{})
	}
	return e.ch
}

func (e *event) signal() {
	if e.ch != nil {
		close(e.ch)
		e.ch = nil
	}
}
