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
// Locking: mu guards pending, nextTag and err. wmu[lane] keeps one
// request record contiguous on its channel (a bulk write is two Writes).
type fsClient struct {
	fuse.RawFileSystem
	st       *proto.Stream
	uid, gid uint32
	ttl      time.Duration

	wmu [2]sync.Mutex

	mu      sync.Mutex
	nextTag uint32
	pending map[uint32]*fsCall
	err     error

	forgets     chan fsproto.ForgetItem
	lastRelieve atomic.Int64
}

type fsCall struct {
	done  chan struct{}
	errno uint16
	body  []byte // reply body (metadata lane)
	dst   []byte // read destination (bulk lane)
	n     int
}

func newFSClient(st *proto.Stream, uid, gid uint32, ttl time.Duration) *fsClient {
	c := &fsClient{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		st:            st, uid: uid, gid: gid, ttl: ttl,
		pending: map[uint32]*fsCall{},
		forgets: make(chan fsproto.ForgetItem, 4096),
	}
	go c.readReplies(fsproto.ChanMetaReply, fsproto.MaxMetaReply)
	go c.readReplies(fsproto.ChanBulkReply, fsproto.MaxBulkReply)
	go c.sendForgets()
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
	br := bufio.NewReaderSize(c.st.Reader(ch), 64<<10)
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
		call.n, call.errno = h.BodyLen, h.Errno
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

// send writes req's record (with data after it) on its lane.
func (c *fsClient) send(req *fsproto.Request, data []byte) error {
	lane, ch := 0, fsproto.ChanMeta
	if req.Op.Bulk() {
		lane, ch = 1, fsproto.ChanBulk
	}
	head := fsproto.AppendRequestHead(make([]byte, 0, fsproto.HeadSize+4+len(req.Name)+len(req.Name2)+min(len(data), 4096)), req, len(data))
	if len(data) <= 4096 {
		head = append(head, data...)
		data = nil
	}
	c.wmu[lane].Lock()
	defer c.wmu[lane].Unlock()
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

// post sends a request that has no reply.
func (c *fsClient) post(req *fsproto.Request, data []byte) {
	c.mu.Lock()
	dead := c.err != nil
	c.mu.Unlock()
	if !dead {
		if err := c.send(req, data); err != nil {
			c.fail(fmt.Errorf("%w: %v", errFSClosed, err))
		}
	}
}

// sendForgets batches the kernel's forgets into few records.
func (c *fsClient) sendForgets() {
	buf := make([]byte, 0, fsproto.MaxForget*fsproto.ForgetItemSize)
	for it := range c.forgets {
		buf = fsproto.AppendForget(buf[:0], it)
	more:
		for len(buf) < cap(buf) {
			select {
			case it := <-c.forgets:
				buf = fsproto.AppendForget(buf, it)
			default:
				break more
			}
		}
		c.post(&fsproto.Request{Op: fsproto.OpForget}, buf)
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
	call, st := c.call(req, nil, nil)
	if st != fuse.OK {
		return st
	}
	node, a, ok := fsproto.DecodeEntry(call.body)
	if !ok {
		return fuse.EIO
	}
	c.fillEntry(node, &a, out)
	return fuse.OK
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
	_, st := c.call(req, nil, nil)
	return st
}

func (c *fsClient) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
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
	c.forgets <- fsproto.ForgetItem{Node: node, Count: n}
}

func (c *fsClient) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	req := &fsproto.Request{Op: fsproto.OpGetattr, Node: in.NodeId}
	if in.Flags()&fuse.FUSE_GETATTR_FH != 0 {
		req.Flags, req.Fh = fsproto.FlagFh, in.Fh()
	}
	return c.attrReply(req, out)
}

func (c *fsClient) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
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
	return c.entry(&fsproto.Request{Op: fsproto.OpLink, Node: in.Oldnodeid, Node2: in.NodeId, Name: name}, out)
}

// Access is answered by the kernel (default_permissions); this only runs
// for access(2) on kernels that ask anyway.
func (c *fsClient) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status { return fuse.OK }

// openFlags for a file the kernel may keep cached across opens: it drops
// the cache itself when the host's mtime or size changes
// (CAP_AUTO_INVAL_DATA); flushes have nothing to do (writes are not
// buffered here).
const openFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH

func (c *fsClient) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpOpen, Node: in.NodeId, OFlags: in.Flags}, nil, nil)
	if st != fuse.OK {
		return st
	}
	fh, ok := fsproto.Uint64(call.body)
	if !ok {
		return fuse.EIO
	}
	out.Fh, out.OpenFlags = fh, openFlags
	return fuse.OK
}

func (c *fsClient) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpCreate, Node: in.NodeId, Name: name, Mode: in.Mode, Umask: in.Umask, OFlags: in.Flags}, nil, nil)
	if st != fuse.OK {
		return st
	}
	node, a, ok := fsproto.DecodeEntry(call.body)
	fh, ok2 := fsproto.Uint64(call.body[min(len(call.body), fsproto.EntrySize):])
	if !ok || !ok2 {
		return fuse.EIO
	}
	c.fillEntry(node, &a, &out.EntryOut)
	out.Fh, out.OpenFlags = fh, openFlags
	return fuse.OK
}

func (c *fsClient) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	size := min(int(in.Size), len(buf), fsproto.MaxIO)
	call, st := c.call(&fsproto.Request{Op: fsproto.OpRead, Fh: in.Fh, Off: in.Offset, Size: uint64(size)}, nil, buf[:size])
	if st != fuse.OK {
		return nil, st
	}
	return fuse.ReadResultData(buf[:call.n]), fuse.OK
}

func (c *fsClient) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if len(data) > fsproto.MaxIO {
		data = data[:fsproto.MaxIO]
	}
	call, st := c.call(&fsproto.Request{Op: fsproto.OpWrite, Fh: in.Fh, Off: in.Offset}, data, nil)
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

func (c *fsClient) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status { return fuse.OK }

func (c *fsClient) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return c.fsync(fsproto.OpFsync, in)
}

func (c *fsClient) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return c.fsync(fsproto.OpFsyncdir, in)
}

func (c *fsClient) fsync(op fsproto.Op, in *fuse.FsyncIn) fuse.Status {
	req := &fsproto.Request{Op: op, Fh: in.Fh}
	if in.FsyncFlags&1 != 0 { // FUSE_FSYNC_FDATASYNC
		req.Flags = fsproto.FlagDatasync
	}
	return c.simple(req)
}

func (c *fsClient) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	return c.simple(&fsproto.Request{Op: fsproto.OpFallocate, Fh: in.Fh, Off: in.Offset, Size: in.Length, Mode: in.Mode})
}

func (c *fsClient) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	call, st := c.call(&fsproto.Request{Op: fsproto.OpLseek, Fh: in.Fh, Off: in.Offset, OFlags: in.Whence}, nil, nil)
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
	call, st := c.call(&fsproto.Request{Op: fsproto.OpOpendir, Node: in.NodeId}, nil, nil)
	if st != fuse.OK {
		return st
	}
	fh, ok := fsproto.Uint64(call.body)
	if !ok {
		return fuse.EIO
	}
	out.Fh = fh
	return fuse.OK
}

func (c *fsClient) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, l *fuse.DirEntryList) fuse.Status {
	return c.readdir(in, l, false)
}

func (c *fsClient) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, l *fuse.DirEntryList) fuse.Status {
	return c.readdir(in, l, true)
}

func (c *fsClient) readdir(in *fuse.ReadIn, l *fuse.DirEntryList, plus bool) fuse.Status {
	req := &fsproto.Request{Op: fsproto.OpReaddir, Fh: in.Fh, Off: in.Offset, Size: uint64(min(in.Size, fsproto.MaxReaddir))}
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
	_, st := c.call(&fsproto.Request{Op: fsproto.OpSetxattr, Node: in.NodeId, Name: attr, OFlags: in.Flags}, data, nil)
	return st
}

func (c *fsClient) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	return c.simple(&fsproto.Request{Op: fsproto.OpRemovexattr, Node: h.NodeId, Name: attr})
}
