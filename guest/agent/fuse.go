package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// fsClient is a FUSE filesystem whose requests the host executes: every
// kernel request becomes one tagged fsproto record on the mount's stream,
// and the calling go-fuse goroutine waits for the reply with that tag, so
// as many requests are in flight as the kernel issues. Reads and writes
// travel on their own channels (fsproto.ChanBulk), so a 1 MiB transfer
// never delays a lookup.
//
// The client trusts the host's replies only as far as their framing: a
// reply with an unknown tag or an oversized body ends the mount's stream.
//
// Requests without a reply (release, forget) are not sent on their own:
// they wait in posts and go out in front of the next metadata request, in
// the same write, or after postDelay. Under TCG every write to the control
// port costs the guest about as much as a whole round trip.
//
// Locking: mu guards pending, nextTag and err. wmu[lane] keeps one
// request record contiguous on its channel (a bulk write is two Writes)
// and, for the metadata lane, guards posts, forgets and flushArmed.
// Order: wmu before mu.
type fsClient struct {
	fuse.RawFileSystem
	st       *proto.Stream
	uid, gid uint32
	ttl      time.Duration

	wmu        [2]sync.Mutex
	posts      []byte // encoded records, guarded by wmu[0]
	forgets    []byte // forget items, guarded by wmu[0]
	flushArmed bool   // a postDelay flush is scheduled, guarded by wmu[0]

	mu      sync.Mutex
	nextTag uint32
	pending map[uint32]*fsCall
	err     error

	lastRelieve atomic.Int64

	win    *memWindow // nil: reads travel on the stream
	fresh  *freshDirs
	lists  *listings
	invals chan inval // for sendInvals

	// dirs holds directory attributes that came with the reply to a
	// change in the directory, for the GETATTR the kernel sends next.
	dirMu sync.Mutex
	dirs  map[uint64]dirAttr
}

type dirAttr struct {
	a  fsproto.Attr
	at time.Time
}

// dirAttrFresh bounds how old a directory's attributes from a change reply
// may be when they answer a GETATTR.
const dirAttrFresh = time.Second

// postDelay bounds how long a release or forget waits for a request to
// ride along with.
const postDelay = 20 * time.Millisecond

type fsCall struct {
	done  chan struct{}
	errno uint16
	body  []byte // reply body (metadata lane)
	dst   []byte // read destination (bulk lane)
	n     int
	flags uint16 // reply flags
}

func newFSClient(st *proto.Stream, uid, gid uint32, ttl time.Duration, win *memWindow) *fsClient {
	c := &fsClient{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		st:            st, uid: uid, gid: gid, ttl: ttl, win: win,
		fresh:   newFreshDirs(ttl),
		pending: map[uint32]*fsCall{},
		dirs:    map[uint64]dirAttr{},
	}
	c.lists = newListings(c, ttl)
	c.invals = make(chan inval, maxPendingInval)
	go c.readReplies(fsproto.ChanMetaReply, fsproto.MaxMetaReply)
	go c.readReplies(fsproto.ChanBulkReply, fsproto.MaxBulkReply)
	return c
}

func (c *fsClient) String() string { return "matchlock" }

var errFSClosed = errors.New("workspace stream closed")

// fail ends the client: pending and future requests get EIO.
func (c *fsClient) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
		logf("workspace: %v", err)
	}
	for tag, call := range c.pending {
		delete(c.pending, tag)
		call.errno = uint16(syscall.EIO)
		close(call.done)
	}
	c.mu.Unlock()
}

func (c *fsClient) readReplies(ch proto.Channel, max int) {
	// Read replies (the bulk lane) go straight into the kernel's buffer;
	// a bufio.Reader would copy each megabyte once more.
	var br io.Reader = c.st.Reader(ch)
	if ch == fsproto.ChanMetaReply {
		br = bufio.NewReaderSize(br, 64<<10)
	}
	var hb [4 + fsproto.ReplyHeadSize]byte
	for {
		if _, err := io.ReadFull(br, hb[:]); err != nil {
			c.fail(fmt.Errorf("%w: %v", errFSClosed, err))
			return
		}
		h, err := fsproto.DecodeReplyHead(hb[:], max)
		if err != nil {
			c.fail(err)
			c.st.Reset(err.Error())
			return
		}
		if h.Flags&fsproto.ReplyPressure != 0 {
			c.relieve()
		}
		if h.Tag == 0 && h.Flags&fsproto.ReplyNotify != 0 && ch == fsproto.ChanMetaReply {
			body := make([]byte, h.BodyLen)
			if _, err := io.ReadFull(br, body); err != nil {
				c.fail(fmt.Errorf("%w: %v", errFSClosed, err))
				return
			}
			if dir, ok := fsproto.Uint64(body); ok {
				c.hostChanged(dir, string(body[8:]))
			}
			continue
		}
		c.mu.Lock()
		call := c.pending[h.Tag]
		delete(c.pending, h.Tag)
		c.mu.Unlock()
		if call == nil || (call.dst != nil && h.BodyLen > len(call.dst)) {
			err := fmt.Errorf("workspace: bad reply (tag %d, %d bytes)", h.Tag, h.BodyLen)
			if call != nil {
				call.errno = uint16(syscall.EIO)
				close(call.done)
			}
			c.fail(err)
			c.st.Reset(err.Error())
			return
		}
		var dst []byte
		if call.dst != nil {
			dst = call.dst[:h.BodyLen]
		} else {
			call.body = make([]byte, h.BodyLen)
			dst = call.body
		}
		if _, err := io.ReadFull(br, dst); err != nil {
			call.errno = uint16(syscall.EIO)
			close(call.done)
			c.fail(fmt.Errorf("%w: %v", errFSClosed, err))
			return
		}
		call.n, call.errno, call.flags = h.BodyLen, h.Errno, h.Flags
		close(call.done)
	}
}

// relieve asks the kernel to drop unused dentries and inodes (at most once
// a second) when the host says it holds many nodes for us: the kernel then
// forgets them, and the host closes their descriptors.
func (c *fsClient) relieve() {
	now := time.Now().UnixNano()
	last := c.lastRelieve.Load()
	if now-last < int64(time.Second) || !c.lastRelieve.CompareAndSwap(last, now) {
		return
	}
	go os.WriteFile("/proc/sys/vm/drop_caches", []byte("2\n"), 0)
}

// send writes req's record (with data after it) on its lane; on the
// metadata lane, waiting posts go first in the same write.
func (c *fsClient) send(req *fsproto.Request, data []byte) error {
	lane, ch := 0, fsproto.ChanMeta
	if req.Op.Bulk() {
		lane, ch = 1, fsproto.ChanBulk
	}
	c.wmu[lane].Lock()
	defer c.wmu[lane].Unlock()
	var head []byte
	if lane == 0 {
		head = c.takePostsLocked()
	}
	head = fsproto.AppendRequestHead(head, req, len(data))
	if len(data) <= 4096 {
		head = append(head, data...)
		data = nil
	}
	if _, err := c.st.Write(ch, head); err != nil {
		return err
	}
	if len(data) > 0 {
		if _, err := c.st.Write(ch, data); err != nil {
			return err
		}
	}
	return nil
}

// call sends req and waits for its reply. For reads, dst receives the data.
func (c *fsClient) call(req *fsproto.Request, data, dst []byte) (*fsCall, fuse.Status) {
	call := &fsCall{done: make(chan struct{}), dst: dst}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, fuse.EIO
	}
	for {
		c.nextTag++
		if _, busy := c.pending[c.nextTag]; c.nextTag != 0 && !busy {
			break
		}
	}
	req.Tag = c.nextTag
	c.pending[req.Tag] = call
	c.mu.Unlock()
	if err := c.send(req, data); err != nil {
		c.fail(fmt.Errorf("%w: %v", errFSClosed, err))
	}
	<-call.done
	if call.errno != 0 {
		return call, fuse.Status(call.errno)
	}
	return call, fuse.OK
}

// post queues a request that has no reply (release, releasedir) or, with
// forget set, one forget item.
func (c *fsClient) post(req *fsproto.Request, forget *fsproto.ForgetItem) {
	c.wmu[0].Lock()
	defer c.wmu[0].Unlock()
	if forget != nil {
		c.forgets = fsproto.AppendForget(c.forgets, *forget)
	} else {
		c.posts = fsproto.AppendRequest(c.posts, req)
	}
	if len(c.forgets) >= fsproto.MaxForget*fsproto.ForgetItemSize || len(c.posts) >= 32<<10 {
		c.flushPostsLocked()
		return
	}
	if !c.flushArmed {
		c.flushArmed = true
		time.AfterFunc(postDelay, func() {
			c.wmu[0].Lock()
			defer c.wmu[0].Unlock()
			c.flushArmed = false
			c.flushPostsLocked()
		})
	}
}

// takePostsLocked returns the queued records (forgets merged into one
// record) and empties the queue.
func (c *fsClient) takePostsLocked() []byte {
	b := c.posts
	if len(c.forgets) > 0 {
		b = fsproto.AppendRequestHead(b, &fsproto.Request{Op: fsproto.OpForget}, len(c.forgets))
		b = append(b, c.forgets...)
	}
	c.posts, c.forgets = nil, c.forgets[:0]
	return b
}

func (c *fsClient) flushPostsLocked() {
	b := c.takePostsLocked()
	if len(b) == 0 {
		return
	}
	c.mu.Lock()
	dead := c.err != nil
	c.mu.Unlock()
	if dead {
		return
	}
	if _, err := c.st.Write(fsproto.ChanMeta, b); err != nil {
		c.fail(fmt.Errorf("%w: %v", errFSClosed, err))
	}
}

func (c *fsClient) setAttr(a *fsproto.Attr, out *fuse.Attr) {
	*out = fuse.Attr{
		Ino: a.Ino, Size: a.Size, Blocks: a.Blocks,
		Atime: uint64(a.Atime.Sec), Atimensec: a.Atime.Nsec,
		Mtime: uint64(a.Mtime.Sec), Mtimensec: a.Mtime.Nsec,
		Ctime: uint64(a.Ctime.Sec), Ctimensec: a.Ctime.Nsec,
		Mode: a.Mode, Nlink: a.Nlink, Rdev: a.Rdev, Blksize: a.Blk,
		Owner: fuse.Owner{Uid: c.uid, Gid: c.gid},
	}
}

func (c *fsClient) fillEntry(node uint64, a *fsproto.Attr, out *fuse.EntryOut) {
	out.NodeId, out.Generation = node, 0
	c.setAttr(a, &out.Attr)
	out.SetEntryTimeout(c.ttl)
	out.SetAttrTimeout(c.ttl)
}

// entry runs a request whose reply is an entry.
func (c *fsClient) entry(req *fsproto.Request, out *fuse.EntryOut) fuse.Status {
	parent := req.Node
	if req.Op == fsproto.OpLink {
		parent = req.Node2
	}
	call, st := c.call(req, nil, nil)
	if st != fuse.OK {
		if st == fuse.Status(syscall.EEXIST) {
			c.fresh.drop(parent) // the host has a name we did not make
			c.lists.added(parent, req.Name)
		}
		return st
	}
	node, a, ok := fsproto.DecodeEntry(call.body)
	if !ok {
		return fuse.EIO
	}
	c.fillEntry(node, &a, out)
	c.noteDirs(req, call.body[fsproto.EntrySize:])
	if req.Op != fsproto.OpLookup {
		c.fresh.add(parent, req.Name)
		c.lists.added(parent, req.Name)
	}
	if req.Op == fsproto.OpMkdir && call.flags&fsproto.ReplyWatched != 0 {
		c.fresh.made(node) // the host tells us what changes in it
	}
	return fuse.OK
}

// noteDirs keeps the directory attributes at the start of b (the tail of
// a reply to req, see fsproto.DirAttrs).
func (c *fsClient) noteDirs(req *fsproto.Request, b []byte) {
	ids := []uint64{req.Node, req.Node2}
	if req.Op == fsproto.OpLink {
		ids = ids[1:]
	}
	now := time.Now()
	c.dirMu.Lock()
	defer c.dirMu.Unlock()
	if len(c.dirs) > 1024 {
		clear(c.dirs)
	}
	for i := 0; i < fsproto.DirAttrs(req.Op); i++ {
		a, ok := fsproto.DecodeAttr(b[min(len(b), i*fsproto.AttrSize):])
		if !ok {
			return
		}
		c.dirs[ids[i]] = dirAttr{a, now}
	}
}

// takeDir returns, once, fresh attributes of directory node from a change
// reply.
func (c *fsClient) takeDir(node uint64) (fsproto.Attr, bool) {
	c.dirMu.Lock()
	defer c.dirMu.Unlock()
	d, ok := c.dirs[node]
	if !ok {
		return fsproto.Attr{}, false
	}
	delete(c.dirs, node)
	return d.a, time.Since(d.at) < min(c.ttl, dirAttrFresh)
}

func (c *fsClient) attrReply(req *fsproto.Request, out *fuse.AttrOut) fuse.Status {
	call, st := c.call(req, nil, nil)
	if st != fuse.OK {
		return st
	}
	a, ok := fsproto.DecodeAttr(call.body)
	if !ok {
		return fuse.EIO
	}
	c.setAttr(&a, &out.Attr)
	out.SetTimeout(c.ttl)
	return fuse.OK
}

func (c *fsClient) simple(req *fsproto.Request) fuse.Status {
	call, st := c.call(req, nil, nil)
	if st != fuse.OK {
		return st
	}
	if fsproto.DirAttrs(req.Op) > 0 {
		c.noteDirs(req, call.body)
	}
	switch {
	case req.Op == fsproto.OpUnlink || req.Op == fsproto.OpRmdir:
		c.fresh.remove(req.Node, req.Name)
		c.lists.removed(req.Node, req.Name)
	case req.Op == fsproto.OpRename && req.OFlags&^unix.RENAME_NOREPLACE == 0:
		c.fresh.remove(req.Node, req.Name)
		c.fresh.add(req.Node2, req.Name2)
		c.lists.removed(req.Node, req.Name)
		c.lists.added(req.Node2, req.Name2)
	case req.Op == fsproto.OpRename: // exchange, whiteout: both names exist after
		c.fresh.drop(req.Node)
		c.fresh.drop(req.Node2)
		c.lists.added(req.Node, req.Name)
		c.lists.added(req.Node2, req.Name2)
	}
	return fuse.OK
}

func (c *fsClient) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if left, ok := c.fresh.absent(h.NodeId, name); ok {
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(min(c.ttl, left))
		return fuse.OK
	}
	if st, ok := c.lists.lookup(h.NodeId, name, out); ok {
		return st
	}
	st := c.entry(&fsproto.Request{Op: fsproto.OpLookup, Node: h.NodeId, Name: name}, out)
	if st == fuse.ENOENT {
		// A negative entry: the kernel remembers the name is absent.
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(c.ttl)
		return fuse.OK
	}
	return st
}

func (c *fsClient) Forget(node, n uint64) {
	c.fresh.drop(node) // the host may reuse the node number once forgotten
	c.post(nil, &fsproto.ForgetItem{Node: node, Count: n})
}

func (c *fsClient) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	req := &fsproto.Request{Op: fsproto.OpGetattr, Node: in.NodeId}
	if in.Flags()&fuse.FUSE_GETATTR_FH != 0 {
		req.Flags, req.Fh = fsproto.FlagFh, in.Fh()
	} else if a, ok := c.takeDir(in.NodeId); ok {
		c.setAttr(&a, &out.Attr)
		out.SetTimeout(c.ttl)
		return fuse.OK
	}
	return c.attrReply(req, out)
}

func (c *fsClient) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	c.lists.touched(in.NodeId)
	req := &fsproto.Request{Op: fsproto.OpSetattr, Node: in.NodeId}
	if fh, ok := in.GetFh(); ok {
		req.Flags, req.Fh = fsproto.FlagFh, fh
	}
	// Ownership is the mount's, not the host's: changing it to anything
	// else is refused, as on a filesystem without owners.
	if uid, ok := in.GetUID(); ok && uid != c.uid {
		return fuse.EPERM
	}
	if gid, ok := in.GetGID(); ok && gid != c.gid {
		return fuse.EPERM
	}
	if mode, ok := in.GetMode(); ok {
		req.Valid |= fsproto.SetMode
		req.Mode = mode
	}
	if size, ok := in.GetSize(); ok {
		req.Valid |= fsproto.SetSize
		req.Size = size
	}
	if in.Valid&fuse.FATTR_ATIME != 0 {
		req.Valid |= fsproto.SetAtime
		if in.Valid&fuse.FATTR_ATIME_NOW != 0 {
			req.Valid |= fsproto.SetAtimeNow
		} else {
			req.Atime = fsproto.Timespec{Sec: int64(in.Atime), Nsec: in.Atimensec}
		}
	}
	if in.Valid&fuse.FATTR_MTIME != 0 {
		req.Valid |= fsproto.SetMtime
		if in.Valid&fuse.FATTR_MTIME_NOW != 0 {
			req.Valid |= fsproto.SetMtimeNow
		} else {
			req.Mtime = fsproto.Timespec{Sec: int64(in.Mtime), Nsec: in.Mtimensec}
		}
	}
	if req.Valid == 0 {
		req.Op = fsproto.OpGetattr
	}
	return c.attrReply(req, out)
}

func (c *fsClient) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpReadlink, Node: h.NodeId}, nil, nil)
	if st != fuse.OK {
		return nil, st
	}
	return call.body, fuse.OK
}

func (c *fsClient) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return c.entry(&fsproto.Request{Op: fsproto.OpMknod, Node: in.NodeId, Name: name, Mode: in.Mode, Umask: in.Umask}, out)
}

func (c *fsClient) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return c.entry(&fsproto.Request{Op: fsproto.OpMkdir, Node: in.NodeId, Name: name, Mode: in.Mode, Umask: in.Umask}, out)
}

func (c *fsClient) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return c.entry(&fsproto.Request{Op: fsproto.OpSymlink, Node: h.NodeId, Name: name, Name2: target}, out)
}

func (c *fsClient) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return c.simple(&fsproto.Request{Op: fsproto.OpUnlink, Node: h.NodeId, Name: name})
}

func (c *fsClient) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return c.simple(&fsproto.Request{Op: fsproto.OpRmdir, Node: h.NodeId, Name: name})
}

func (c *fsClient) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return c.simple(&fsproto.Request{Op: fsproto.OpRename, Node: in.NodeId, Name: oldName, Node2: in.Newdir, Name2: newName, OFlags: in.Flags})
}

func (c *fsClient) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	c.lists.touched(in.Oldnodeid) // its link count changes
	return c.entry(&fsproto.Request{Op: fsproto.OpLink, Node: in.Oldnodeid, Node2: in.NodeId, Name: name}, out)
}

// Access is answered by the kernel (default_permissions); this only runs
// for access(2) on kernels that ask anyway.
func (c *fsClient) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status { return fuse.OK }

// Open and OpenDir answer ENOSYS: the kernel then stops sending OPEN,
// OPENDIR, RELEASE and RELEASEDIR (CAP_NO_OPEN_SUPPORT), keeps file data
// cached across opens (it drops it when the host's mtime or size changes,
// CAP_AUTO_INVAL_DATA) and caches directory listings; I/O names the node
// and the host keeps a descriptor per node. That saves two round trips per
// open/close: the kernel, not the host, checks access modes anyway, and
// O_TRUNC arrives as a truncating SETATTR.
func (c *fsClient) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fuse.ENOSYS
}

// openFlags are those of files made by Create (which has to answer with
// a handle); flushes have nothing to do, writes are not buffered here.
const openFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH

func (c *fsClient) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpCreate, Flags: fsproto.FlagNoHandle, Node: in.NodeId, Name: name,
		Mode: in.Mode, Umask: in.Umask, OFlags: in.Flags}, nil, nil)
	if st != fuse.OK {
		if st == fuse.Status(syscall.EEXIST) {
			c.fresh.drop(in.NodeId)
			c.lists.added(in.NodeId, name)
		}
		return st
	}
	c.fresh.add(in.NodeId, name)
	c.lists.added(in.NodeId, name)
	node, a, ok := fsproto.DecodeEntry(call.body)
	fh, ok2 := fsproto.Uint64(call.body[min(len(call.body), fsproto.EntrySize):])
	if !ok || !ok2 {
		return fuse.EIO
	}
	c.fillEntry(node, &a, &out.EntryOut)
	c.noteDirs(&fsproto.Request{Op: fsproto.OpCreate, Node: in.NodeId}, call.body[fsproto.EntrySize+8:])
	out.Fh, out.OpenFlags = fh, openFlags
	return fuse.OK
}

func (c *fsClient) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	size := min(int(in.Size), len(buf), fsproto.MaxIO)
	req := &fsproto.Request{Op: fsproto.OpRead, Node: in.NodeId, Fh: in.Fh, Off: in.Offset, Size: uint64(size)}
	if c.win != nil {
		if res, st, ok := c.windowRead(req); ok {
			return res, st
		}
	}
	call, st := c.call(req, nil, buf[:size])
	if st != fuse.OK {
		return nil, st
	}
	return fuse.ReadResultData(buf[:call.n]), fuse.OK
}

func (c *fsClient) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	c.lists.touched(in.NodeId)
	if len(data) > fsproto.MaxIO {
		data = data[:fsproto.MaxIO]
	}
	call, st := c.call(&fsproto.Request{Op: fsproto.OpWrite, Node: in.NodeId, Fh: in.Fh, Off: in.Offset}, data, nil)
	if st != fuse.OK {
		return 0, st
	}
	n, ok := fsproto.Uint32(call.body)
	if !ok {
		return 0, fuse.EIO
	}
	return n, fuse.OK
}

func (c *fsClient) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	c.post(&fsproto.Request{Op: fsproto.OpRelease, Fh: in.Fh}, nil)
}

// Flush answers ENOSYS: the kernel then never sends FLUSH again (writes
// reach the host before write(2) returns; there is nothing to flush).
func (c *fsClient) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status { return fuse.ENOSYS }

func (c *fsClient) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return c.fsync(fsproto.OpFsync, in)
}

func (c *fsClient) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return c.fsync(fsproto.OpFsyncdir, in)
}

func (c *fsClient) fsync(op fsproto.Op, in *fuse.FsyncIn) fuse.Status {
	req := &fsproto.Request{Op: op, Node: in.NodeId, Fh: in.Fh}
	if in.FsyncFlags&1 != 0 { // FUSE_FSYNC_FDATASYNC
		req.Flags = fsproto.FlagDatasync
	}
	return c.simple(req)
}

func (c *fsClient) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	c.lists.touched(in.NodeId)
	return c.simple(&fsproto.Request{Op: fsproto.OpFallocate, Node: in.NodeId, Fh: in.Fh, Off: in.Offset, Size: in.Length, Mode: in.Mode})
}

func (c *fsClient) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpLseek, Node: in.NodeId, Fh: in.Fh, Off: in.Offset, OFlags: in.Whence}, nil, nil)
	if st != fuse.OK {
		return st
	}
	off, ok := fsproto.Uint64(call.body)
	if !ok {
		return fuse.EIO
	}
	out.Offset = off
	return fuse.OK
}

func (c *fsClient) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fuse.ENOSYS // see Open
}

func (c *fsClient) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, l *fuse.DirEntryList) fuse.Status {
	return c.readdir(in, l, false)
}

func (c *fsClient) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, l *fuse.DirEntryList) fuse.Status {
	return c.readdir(in, l, true)
}

func (c *fsClient) readdir(in *fuse.ReadIn, l *fuse.DirEntryList, plus bool) fuse.Status {
	req := &fsproto.Request{Op: fsproto.OpReaddir, Node: in.NodeId, Fh: in.Fh, Off: in.Offset, Size: uint64(min(in.Size, fsproto.MaxReaddir))}
	if plus {
		req.Flags = fsproto.FlagPlus
	}
	call, st := c.call(req, nil, nil)
	if st != fuse.OK {
		return st
	}
	full := false
	err := fsproto.DecodeDirents(call.body, plus, func(d *fsproto.Dirent) bool {
		e := fuse.DirEntry{Name: d.Name, Ino: d.Ino, Off: d.Off, Mode: uint32(d.Type) << 12}
		if full {
			// Never given to the kernel: give the reference back.
			if d.Node != 0 {
				c.Forget(d.Node, 1)
			}
			return true
		}
		if !plus {
			full = !l.AddDirEntry(e)
			return true
		}
		out := l.AddDirLookupEntry(e)
		if out == nil {
			full = true
			if d.Node != 0 {
				c.Forget(d.Node, 1)
			}
			return true
		}
		if d.Node != 0 {
			c.fillEntry(d.Node, &d.Attr, out)
		}
		return true
	})
	if err != nil {
		return fuse.EIO
	}
	return fuse.OK
}

func (c *fsClient) ReleaseDir(in *fuse.ReleaseIn) {
	c.post(&fsproto.Request{Op: fsproto.OpReleasedir, Fh: in.Fh}, nil)
}

func (c *fsClient) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpStatfs, Node: h.NodeId}, nil, nil)
	if st != fuse.OK {
		return st
	}
	s, ok := fsproto.DecodeStatfs(call.body)
	if !ok {
		return fuse.EIO
	}
	*out = fuse.StatfsOut{Blocks: s.Blocks, Bfree: s.Bfree, Bavail: s.Bavail, Files: s.Files, Ffree: s.Ffree,
		Bsize: s.Bsize, NameLen: s.NameLen, Frsize: s.Frsize}
	return fuse.OK
}

func (c *fsClient) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	size := min(len(dest), fsproto.MaxXattrValue)
	call, st := c.call(&fsproto.Request{Op: fsproto.OpGetxattr, Node: h.NodeId, Name: attr, Size: uint64(size)}, nil, nil)
	return c.sized(call, st, dest)
}

func (c *fsClient) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	size := min(len(dest), fsproto.MaxXattrValue)
	call, st := c.call(&fsproto.Request{Op: fsproto.OpListxattr, Node: h.NodeId, Size: uint64(size)}, nil, nil)
	return c.sized(call, st, dest)
}

// sized turns a getxattr/listxattr reply into go-fuse's convention: the
// size alone for an empty buffer, else the bytes copied.
func (c *fsClient) sized(call *fsCall, st fuse.Status, dest []byte) (uint32, fuse.Status) {
	if st != fuse.OK {
		return 0, st
	}
	if len(dest) == 0 {
		n, ok := fsproto.Uint32(call.body)
		if !ok {
			return 0, fuse.EIO
		}
		return n, fuse.OK
	}
	if len(call.body) > len(dest) {
		return 0, fuse.ERANGE
	}
	return uint32(copy(dest, call.body)), fuse.OK
}

func (c *fsClient) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	c.lists.touched(in.NodeId)
	_, st := c.call(&fsproto.Request{Op: fsproto.OpSetxattr, Node: in.NodeId, Name: attr, OFlags: in.Flags}, data, nil)
	return st
}

func (c *fsClient) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	c.lists.touched(h.NodeId)
	return c.simple(&fsproto.Request{Op: fsproto.OpRemovexattr, Node: h.NodeId, Name: attr})
}
