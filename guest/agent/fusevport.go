package agent

import (
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// vport reads the control port with readv(2). The virtio console driver
// hands out at most one of its page-sized receive buffers per read(2), so
// a plain read of 64 KiB costs 16 system calls; readv with page-sized
// segments drains up to len(p)/4096 buffers in one (the kernel loops over
// the segments and stops at the first short one or when no data is left).
// Under TCG a system call is tens of µs: this is most of the host→guest
// bandwidth of shared directories and file copies.
type vport struct {
	*os.File
	rc  syscall.RawConn
	iov [][]byte
}

// vportSegment is the driver's receive buffer size (PAGE_SIZE).
const vportSegment = 4096

func newVport(f *os.File) *vport {
	p := &vport{File: f}
	if rc, err := f.SyscallConn(); err == nil {
		p.rc = rc
	}
	return p
}

// Read fills p from as many driver buffers as are ready (at least one,
// waiting for data like os.File.Read). Only one goroutine reads the port.
func (p *vport) Read(b []byte) (int, error) {
	if p.rc == nil || len(b) <= vportSegment {
		return p.File.Read(b)
	}
	p.iov = p.iov[:0]
	for off := 0; off < len(b); off += vportSegment {
		p.iov = append(p.iov, b[off:min(off+vportSegment, len(b))])
	}
	var n int
	var err error
	if rerr := p.rc.Read(func(fd uintptr) bool {
		n, err = unix.Readv(int(fd), p.iov)
		return err != unix.EAGAIN
	}); rerr != nil {
		return 0, rerr
	}
	if err == unix.EINTR {
		return 0, nil
	}
	if err != nil {
		return 0, &os.PathError{Op: "readv", Path: p.Name(), Err: err}
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}
