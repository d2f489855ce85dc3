// Package workspace shares host directories with a sandbox, safely. It is
// the host half of matchlock's shared directories: a Server executes the
// filesystem requests that the guest agent's FUSE mount forwards over one
// guest/proto stream (wire format: guest/proto/fsproto), against one host
// directory, and nothing outside it. The package also manages named
// volumes: sparse ext4 images attached to a sandbox as extra disks.
//
// # Containment
//
// The server never resolves a path string from the guest. Every inode the
// guest knows is a node: an O_PATH descriptor. The root node is the shared
// directory; every other node was obtained by looking up one validated
// name (no '/', no NUL, not "." or "..", at most 255 bytes) relative to a
// directory node with openat2(O_PATH|O_NOFOLLOW, RESOLVE_BENEATH |
// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS). So a node is always an
// inode that was reachable inside the shared directory, symlinks are
// never followed on the host (the guest kernel resolves them in its own
// namespace), and swapping a directory for a symlink between two requests
// cannot redirect a lookup. Operations that create, remove or rename act
// on (directory node, validated name) with the *at system calls. Files are
// opened only after fstat on the node shows a regular file (or a directory
// for opendir), by reopening that very inode through /proc/self/fd, so the
// host never opens a FIFO, socket or device node. Creating device nodes
// and whiteouts is refused; a hardlink's source is always a node, so it
// can only be an inode inside the share. Extended attributes are limited
// to the user.* namespace, so a guest cannot set file capabilities or
// security labels on the host. In read-only mode every mutating request
// fails with EROFS on the host and files are opened O_RDONLY.
//
// Every number a guest controls is bounded: request and reply sizes
// (fsproto limits), requests in flight per channel (Config.MaxInFlight,
// Config.MaxBulkInFlight), nodes (Config.MaxNodes) and open handles
// (Config.MaxHandles), plus a process-wide budget of descriptors.
package workspace

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// Defaults of Config.
const (
	DefaultMaxNodes        = 16384
	DefaultMaxHandles      = 1024
	DefaultMaxInFlight     = 32
	DefaultMaxBulkInFlight = 8
)

// Config configures a Server.
type Config struct {
	// Dir is the shared host directory. It is opened once by New; a
	// symlink in Dir itself is followed then, never later.
	Dir string
	// ReadOnly makes the server refuse every change with EROFS.
	ReadOnly bool
	// MaxNodes bounds the inodes the guest may hold references to
	// (each is an open O_PATH descriptor). Default DefaultMaxNodes.
	MaxNodes int
	// MaxHandles bounds open files and directories. Default
	// DefaultMaxHandles.
	MaxHandles int
	// MaxInFlight bounds metadata requests being read or executed at
	// once; MaxBulkInFlight bounds reads and writes (each holds up to
	// fsproto.MaxIO bytes). Defaults DefaultMaxInFlight and
	// DefaultMaxBulkInFlight.
	MaxInFlight, MaxBulkInFlight int
}

// Stream is what Serve needs of a guest/proto stream.
type Stream interface {
	Read(ch proto.Channel, p []byte) (int, error)
	Write(ch proto.Channel, p []byte) (int, error)
	Reset(reason string) error
	Done() <-chan struct{}
}

var _ Stream = (*proto.Stream)(nil)

// Server serves one shared directory.
//
// Locking: mu guards the node and handle tables and every node's and
// handle's refs/dead/nlookup fields. It is held only for table updates,
// never across a system call other than close(2). A handle's dirMu
// serialises lseek+getdents on a directory handle.
type Server struct {
	cfg    Config
	rootFd int // O_PATH of Dir
	procFd int // O_PATH of /proc/self/fd

	mu sync.Mutex
	// Guarded by mu:
	nodes    map[uint64]*node
	byIno    map[inoKey]*node
	nextNode uint64
	handles  map[uint64]*handle
	nextFh   uint64
	closed   bool

	served atomic.Bool

	window                   atomic.Pointer[[]byte] // see SetWindow
	windowReads, streamReads atomic.Uint64
	lookups                  atomic.Uint64

	w *watcher // nil without inotify (watch.go)
}

// SetWindow gives the server the mount's read window: guest memory this
// process maps (proto.MountRequest.WindowSize). Reads with
// fsproto.FlagWindow put their data there, at the offset they name. The
// guest may change the window's bytes at any time; the server only writes
// into it. Set it before the guest learns it may use it.
func (s *Server) SetWindow(w []byte) { s.window.Store(&w) }

// inoKey identifies an inode on the host.
type inoKey struct{ dev, ino uint64 }

// node is an inode the guest holds lookup references to.
type node struct {
	id  uint64
	fd  int    // O_PATH, O_NOFOLLOW; immutable
	typ uint32 // S_IFMT bits; an inode's type never changes
	key inoKey
	// For I/O without a handle (see openIO): ioMu guards iofd; dirMu
	// serialises lseek+getdents on iofd[ioDir].
	ioMu  sync.Mutex
	iofd  [ioKinds]int // descriptor + 1; 0 = not open
	dirMu sync.Mutex
	// Guarded by Server.mu:
	nlookup uint64 // references the guest kernel holds (lookups minus forgets)
	refs    int    // requests using fd right now
	dead    bool   // out of the tables; fd closed once refs is 0
}

// ioKind selects one of a node's I/O descriptors.
type ioKind int

const (
	ioRead ioKind = iota
	ioWrite
	ioDir
	ioKinds
)

// handle is an open file or directory.
type handle struct {
	fd    int
	dir   bool
	dirMu sync.Mutex
	// Guarded by Server.mu:
	refs int
	dead bool
}

// RootNode is the node ID of the shared directory (FUSE_ROOT_ID).
const RootNode = 1

// New opens cfg.Dir and returns a server for it.
func New(cfg Config) (*Server, error) {
	if cfg.MaxNodes <= 0 {
		cfg.MaxNodes = DefaultMaxNodes
	}
	if cfg.MaxHandles <= 0 {
		cfg.MaxHandles = DefaultMaxHandles
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.MaxBulkInFlight <= 0 {
		cfg.MaxBulkInFlight = DefaultMaxBulkInFlight
	}
	root, err := unix.Open(cfg.Dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("workspace %s: %w", cfg.Dir, &os.PathError{Op: "open", Path: cfg.Dir, Err: err})
	}
	var st unix.Stat_t
	if err := unix.Fstat(root, &st); err != nil {
		unix.Close(root)
		return nil, fmt.Errorf("workspace %s: %w", cfg.Dir, err)
	}
	proc, err := unix.Open("/proc/self/fd", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(root)
		return nil, fmt.Errorf("workspace: /proc/self/fd: %w (is /proc mounted?)", err)
	}
	// openat2 appeared in Linux 5.6; refuse to run without it rather than
	// fall back to weaker resolution.
	if fd, err := lookupAt(root, "."); err != nil && errors.Is(err, unix.ENOSYS) {
		unix.Close(root)
		unix.Close(proc)
		return nil, errors.New("workspace: the host kernel lacks openat2 (Linux 5.6 or later is needed)")
	} else if err == nil {
		unix.Close(fd)
	}
	s := &Server{
		cfg: cfg, rootFd: root, procFd: proc, w: newWatcher(),
		nodes:    map[uint64]*node{},
		byIno:    map[inoKey]*node{},
		nextNode: RootNode + 1,
		handles:  map[uint64]*handle{},
		nextFh:   1,
	}
	rn := &node{id: RootNode, fd: root, typ: st.Mode & unix.S_IFMT, key: inoKey{st.Dev, st.Ino}, nlookup: 1}
	s.nodes[RootNode] = rn
	s.byIno[rn.key] = rn
	return s, nil
}

// Close releases every descriptor. Call it after Serve has returned;
// requests handled afterwards fail with EIO.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.w.close()
	for _, n := range s.nodes {
		n.dead = true
		if n.refs == 0 {
			s.closeNodeLocked(n)
		}
	}
	for _, h := range s.handles {
		h.dead = true
		if h.refs == 0 {
			closeFd(h.fd)
		}
	}
	s.nodes, s.byIno, s.handles = map[uint64]*node{}, map[inoKey]*node{}, map[uint64]*handle{}
	unix.Close(s.procFd)
	return nil
}

// Stats are a server's current table sizes and counters.
type Stats struct {
	Nodes, Handles int
	// WindowReads and StreamReads count the reads answered through the
	// shared memory window and on the stream; Lookups the LOOKUPs.
	WindowReads, StreamReads, Lookups uint64
}

// Stats returns the current table sizes and counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Nodes: len(s.nodes), Handles: len(s.handles),
		WindowReads: s.windowReads.Load(), StreamReads: s.streamReads.Load(), Lookups: s.lookups.Load()}
}

// ErrMalformed matches the error Serve returns when the guest broke the
// protocol (the stream is then reset).
var ErrMalformed = fsproto.ErrMalformed

type lane struct {
	in, out proto.Channel
	bulk    bool
	maxReq  int
	slots   chan struct{}
	reqPool *sync.Pool
	repPool *sync.Pool
	maxRep  int
}

func bufPool(size int) *sync.Pool {
	return &sync.Pool{New: func() any { b := make([]byte, 0, size); return &b }}
}

// Serve executes the requests arriving on st until the stream ends, ctx is
// done, or the guest breaks the protocol (then st is reset and the error
// matches ErrMalformed). It returns once every request it started has
// finished. Serve may be called once per Server.
func (s *Server) Serve(ctx context.Context, st Stream) error {
	if s.served.Swap(true) {
		return errors.New("workspace: Serve called twice")
	}
	lanes := []*lane{
		{in: fsproto.ChanMeta, out: fsproto.ChanMetaReply, maxReq: fsproto.MaxMetaRequest, maxRep: fsproto.MaxMetaReply,
			slots: make(chan struct{}, s.cfg.MaxInFlight)},
		{in: fsproto.ChanBulk, out: fsproto.ChanBulkReply, bulk: true, maxReq: fsproto.MaxBulkRequest, maxRep: fsproto.MaxBulkReply,
			slots: make(chan struct{}, s.cfg.MaxBulkInFlight)},
	}
	for _, l := range lanes {
		l.reqPool, l.repPool = bufPool(l.maxReq), bufPool(4+l.maxRep)
	}
	var wg sync.WaitGroup
	errc := make(chan error, len(lanes))
	for _, l := range lanes {
		go func() { errc <- s.readLoop(st, l, &wg) }()
	}
	if s.w != nil {
		go s.w.run(func(dir uint64, name string) { st.Write(fsproto.ChanMetaReply, notifyRecord(dir, name)) })
	}
	var err error
	select {
	case err = <-errc:
	case <-ctx.Done():
		err = ctx.Err()
	}
	st.Reset(resetReason(err))
	for range len(lanes) - 1 {
		<-errc
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = nil
	}
	// The other lanes' errors are consequences of the Reset.
	wg.Wait()
	return err
}

func resetReason(err error) string {
	if err == nil || errors.Is(err, io.EOF) {
		return "workspace: done"
	}
	return "workspace: " + err.Error()
}

type chanReader struct {
	st Stream
	ch proto.Channel
}

func (r chanReader) Read(p []byte) (int, error) { return r.st.Read(r.ch, p) }

func (s *Server) readLoop(st Stream, l *lane, wg *sync.WaitGroup) error {
	br := bufio.NewReaderSize(chanReader{st, l.in}, 64<<10)
	var lenb [4]byte
	for {
		l.slots <- struct{}{}
		if _, err := io.ReadFull(br, lenb[:]); err != nil {
			<-l.slots
			return err
		}
		n := binary.BigEndian.Uint32(lenb[:])
		if n < fsproto.HeadSize || n > uint32(l.maxReq) {
			<-l.slots
			return fmt.Errorf("%w: request length %d", ErrMalformed, n)
		}
		bp := l.reqPool.Get().(*[]byte)
		buf := (*bp)[:n]
		if _, err := io.ReadFull(br, buf); err != nil {
			l.reqPool.Put(bp)
			<-l.slots
			return err
		}
		req, err := fsproto.DecodeRequest(buf)
		if err == nil && req.Op.Bulk() != l.bulk {
			err = fmt.Errorf("%w: %s on the wrong channel", ErrMalformed, req.Op)
		}
		if err != nil {
			l.reqPool.Put(bp)
			<-l.slots
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveOne(st, l, req)
			l.reqPool.Put(bp)
			<-l.slots
		}()
	}
}

func (s *Server) serveOne(st Stream, l *lane, req *fsproto.Request) {
	rp := l.repPool.Get().(*[]byte)
	const head = 4 + fsproto.ReplyHeadSize
	buf := (*rp)[:head]
	buf, errno, flags := s.execWatched(req, buf)
	if !req.Op.NoReply() {
		if errno != 0 {
			buf = buf[:head]
		}
		fsproto.AppendReplyHead(buf[:0], req.Tag, uint16(errno), s.replyFlags()|flags, len(buf)-head)
		st.Write(l.out, buf)
	}
	if cap(buf) <= 4+l.maxRep {
		*rp = buf[:0]
	}
	l.repPool.Put(rp)
}

// replyFlags tells the guest when it holds too many nodes.
func (s *Server) replyFlags() uint16 {
	s.mu.Lock()
	n := len(s.nodes)
	s.mu.Unlock()
	if n >= s.cfg.MaxNodes*3/4 || fdsHeld.Load() >= fdBudget()*3/4 {
		return fsproto.ReplyPressure
	}
	return 0
}

// Handle executes one request and returns the reply body. It is what
// Serve runs for each request; tests call it to forge requests directly.
func (s *Server) Handle(req *fsproto.Request) ([]byte, syscall.Errno) {
	b, e, _ := s.execWatched(req, nil)
	if e != 0 {
		return nil, syscall.Errno(e)
	}
	return b, 0
}

// execWatched runs exec with the watcher's part (watch.go): changes of
// names are noted as this server's own, a readdir with FlagWatch and a
// new directory are watched, and the reply flags say so.
func (s *Server) execWatched(req *fsproto.Request, out []byte) ([]byte, unix.Errno, uint16) {
	var flags uint16
	switch req.Op {
	case fsproto.OpCreate, fsproto.OpMkdir, fsproto.OpMknod, fsproto.OpSymlink, fsproto.OpUnlink, fsproto.OpRmdir:
		s.w.ownChange(req.Node, req.Name)
	case fsproto.OpRename:
		s.w.ownChange(req.Node, req.Name)
		s.w.ownChange(req.Node2, req.Name2)
	case fsproto.OpLink:
		s.w.ownChange(req.Node2, req.Name)
	case fsproto.OpReaddir:
		if req.Flags&fsproto.FlagWatch != 0 && s.watchNode(req.Node) {
			flags |= fsproto.ReplyWatched
		}
	}
	start := len(out)
	out, e := s.exec(req, out)
	if e == 0 && req.Op == fsproto.OpMkdir {
		if id, _, ok := fsproto.DecodeEntry(out[start:]); ok && s.watchNode(id) {
			flags |= fsproto.ReplyWatched
		}
	}
	return out, e, flags
}

// watchNode watches directory node id.
func (s *Server) watchNode(id uint64) bool {
	if s.w == nil {
		return false
	}
	n, e := s.getNode(id)
	if e != 0 {
		return false
	}
	defer s.putNode(n)
	return n.typ == unix.S_IFDIR && s.w.watch(id, n.fd)
}

// fdsHeld counts the descriptors all servers of this process hold for
// guests; fdBudget bounds it below the process's descriptor limit.
var fdsHeld atomic.Int64

var fdBudget = sync.OnceValue(func() int64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur < 1024 {
		return 768
	}
	return int64(rl.Cur) * 3 / 4
})

func closeFd(fd int) {
	unix.Close(fd)
	fdsHeld.Add(-1)
}
