package workspace

import (
	"errors"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// exec executes req and appends its reply body to out.
func (s *Server) exec(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	if req.Validate() != nil {
		return out, unix.EINVAL // a request that did not come through DecodeRequest
	}
	if s.cfg.ReadOnly && mutates(req) {
		return out, unix.EROFS
	}
	switch req.Op {
	case fsproto.OpLookup:
		s.lookups.Add(1)
		return s.lookup(req, out)
	case fsproto.OpForget:
		fsproto.Forgets(req.Data, func(it fsproto.ForgetItem) { s.forget(it.Node, it.Count) })
		return out, 0
	case fsproto.OpGetattr:
		return s.getattr(req, out)
	case fsproto.OpSetattr:
		return s.setattr(req, out)
	case fsproto.OpReadlink:
		return s.readlink(req, out)
	case fsproto.OpSymlink, fsproto.OpMknod, fsproto.OpMkdir:
		return s.dirAttrs(req, req.Node, 0)(s.makeNode(req, out))
	case fsproto.OpUnlink, fsproto.OpRmdir:
		return s.dirAttrs(req, req.Node, 0)(s.remove(req, out))
	case fsproto.OpRename:
		return s.dirAttrs(req, req.Node, req.Node2)(s.rename(req, out))
	case fsproto.OpLink:
		return s.dirAttrs(req, req.Node2, 0)(s.link(req, out))
	case fsproto.OpOpen, fsproto.OpOpendir:
		return s.open(req, out)
	case fsproto.OpCreate:
		return s.dirAttrs(req, req.Node, 0)(s.create(req, out))
	case fsproto.OpRead:
		return s.read(req, out)
	case fsproto.OpWrite:
		return s.write(req, out)
	case fsproto.OpRelease, fsproto.OpReleasedir:
		s.release(req.Fh, req.Op == fsproto.OpReleasedir)
		return out, 0
	case fsproto.OpFsync, fsproto.OpFsyncdir:
		return s.fsync(req, out)
	case fsproto.OpReaddir:
		return s.readdir(req, out)
	case fsproto.OpStatfs:
		return s.statfs(req, out)
	case fsproto.OpSetxattr, fsproto.OpGetxattr, fsproto.OpListxattr, fsproto.OpRemovexattr:
		return s.xattr(req, out)
	case fsproto.OpFallocate:
		return s.fallocate(req, out)
	case fsproto.OpLseek:
		return s.lseek(req, out)
	}
	return out, unix.ENOSYS
}

// dirAttrs returns a function that appends, after a successful reply, the
// attributes of the directories the request changed (dir2 0: one). The
// guest kernel invalidates a directory's attributes when it changes and
// fetches them before its next permission check in it; the guest answers
// that from these instead of another round trip (fsproto: DirAttrs).
func (s *Server) dirAttrs(req *fsproto.Request, dir, dir2 uint64) func([]byte, unix.Errno) ([]byte, unix.Errno) {
	return func(out []byte, e unix.Errno) ([]byte, unix.Errno) {
		if e != 0 {
			return out, e
		}
		for _, id := range []uint64{dir, dir2} {
			if id == 0 {
				continue
			}
			n, e := s.getNode(id)
			if e != 0 {
				return out, e
			}
			out, e = appendStat(n.fd, out)
			s.putNode(n)
			if e != 0 {
				return out, e
			}
		}
		return out, 0
	}
}

// mutates reports whether req would change the shared directory.
func mutates(req *fsproto.Request) bool {
	switch req.Op {
	case fsproto.OpSetattr, fsproto.OpSymlink, fsproto.OpMknod, fsproto.OpMkdir, fsproto.OpUnlink, fsproto.OpRmdir,
		fsproto.OpRename, fsproto.OpLink, fsproto.OpCreate, fsproto.OpWrite, fsproto.OpSetxattr,
		fsproto.OpRemovexattr, fsproto.OpFallocate:
		return true
	case fsproto.OpOpen:
		return req.OFlags&unix.O_ACCMODE != unix.O_RDONLY || req.OFlags&unix.O_TRUNC != 0
	}
	return false
}

func toErrno(err error) unix.Errno {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	return unix.EIO
}

// lookupAt opens name in directory dirfd as an O_PATH descriptor, never
// following a symlink and never leaving dirfd.
func lookupAt(dirfd int, name string) (int, error) {
	how := unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(dirfd, name, &how)
		if (err == unix.EAGAIN || err == unix.EINTR) && i < 16 {
			continue
		}
		return fd, err
	}
}

// entryAt looks name up in dir and appends the entry.
func (s *Server) entryAt(dir *node, name string, out []byte) ([]byte, unix.Errno) {
	fd, err := lookupAt(dir.fd, name)
	if err != nil {
		return out, toErrno(err)
	}
	return s.entryFd(fd, out)
}

// entryFd turns an O_PATH descriptor (passed on) into a node and appends
// its entry.
func (s *Server) entryFd(fd int, out []byte) ([]byte, unix.Errno) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return out, toErrno(err)
	}
	id, e := s.addNode(fd, &st)
	if e != 0 {
		return out, e
	}
	a := toAttr(&st)
	return fsproto.AppendEntry(out, id, &a), 0
}

func toAttr(st *unix.Stat_t) fsproto.Attr {
	return fsproto.Attr{
		Ino: st.Ino, Size: uint64(st.Size), Blocks: uint64(st.Blocks),
		Atime: fsproto.Timespec{Sec: st.Atim.Sec, Nsec: uint32(st.Atim.Nsec)},
		Mtime: fsproto.Timespec{Sec: st.Mtim.Sec, Nsec: uint32(st.Mtim.Nsec)},
		Ctime: fsproto.Timespec{Sec: st.Ctim.Sec, Nsec: uint32(st.Ctim.Nsec)},
		Mode:  st.Mode, Nlink: uint32(st.Nlink), Rdev: uint32(st.Rdev), Blk: uint32(st.Blksize),
	}
}

func appendStat(fd int, out []byte) ([]byte, unix.Errno) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return out, toErrno(err)
	}
	a := toAttr(&st)
	return fsproto.AppendAttr(out, &a), 0
}

func (s *Server) lookup(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	dir, e := s.getDir(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(dir)
	return s.entryAt(dir, req.Name, out)
}

func (s *Server) getattr(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	if req.Flags&fsproto.FlagFh != 0 {
		if h, e := s.getAnyHandle(req.Fh); e == 0 {
			defer s.putHandle(h)
			return appendStat(h.fd, out)
		}
	}
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	return appendStat(n.fd, out)
}

// procName names descriptor fd in s.procFd (/proc/self/fd).
func procName(fd int) string { return strconv.Itoa(fd) }

// procPath is the /proc path of our descriptor fd, for the calls that have
// no *at form taking an O_PATH descriptor (xattrs, truncate).
func procPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// reopen opens the inode of node n (which the caller checked is a regular
// file or directory) with flags, through /proc/self/fd: the very inode,
// however the tree changed since it was looked up.
func (s *Server) reopen(n *node, flags int) (int, unix.Errno) {
	fd, err := unix.Openat(s.procFd, procName(n.fd), flags|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return -1, toErrno(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || (inoKey{st.Dev, st.Ino}) != n.key || st.Mode&unix.S_IFMT != n.typ {
		unix.Close(fd)
		return -1, unix.ESTALE
	}
	return fd, 0
}

func (s *Server) setattr(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	var h *handle
	if req.Flags&fsproto.FlagFh != 0 {
		if hh, e := s.getHandle(req.Fh, false); e == 0 {
			h = hh
			defer s.putHandle(h)
		}
	}
	// Size before mode: an unprivileged truncate clears setuid, the mode
	// the guest asked for must win.
	if req.Valid&fsproto.SetSize != 0 {
		if n.typ != unix.S_IFREG {
			if n.typ == unix.S_IFDIR {
				return out, unix.EISDIR
			}
			return out, unix.EINVAL
		}
		var err error
		if h != nil {
			err = unix.Ftruncate(h.fd, int64(req.Size))
			if err == unix.EBADF || err == unix.EINVAL { // opened read-only
				err = unix.Truncate(procPath(n.fd), int64(req.Size))
			}
		} else {
			err = unix.Truncate(procPath(n.fd), int64(req.Size))
		}
		if err != nil {
			return out, toErrno(err)
		}
	}
	if req.Valid&fsproto.SetMode != 0 {
		if n.typ == unix.S_IFLNK {
			return out, unix.EOPNOTSUPP
		}
		if err := unix.Fchmodat(s.procFd, procName(n.fd), req.Mode&0o7777, 0); err != nil {
			return out, toErrno(err)
		}
	}
	if req.Valid&(fsproto.SetAtime|fsproto.SetMtime) != 0 {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		for i, set := range []struct {
			on, now uint32
			t       fsproto.Timespec
		}{{fsproto.SetAtime, fsproto.SetAtimeNow, req.Atime}, {fsproto.SetMtime, fsproto.SetMtimeNow, req.Mtime}} {
			switch {
			case req.Valid&set.on == 0:
			case req.Valid&set.now != 0:
				ts[i] = unix.Timespec{Nsec: unix.UTIME_NOW}
			default:
				ts[i] = unix.Timespec{Sec: set.t.Sec, Nsec: int64(set.t.Nsec)}
			}
		}
		if err := unix.UtimesNanoAt(n.fd, "", ts, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return out, toErrno(err)
		}
	}
	return appendStat(n.fd, out)
}

func (s *Server) readlink(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	if n.typ != unix.S_IFLNK {
		return out, unix.EINVAL
	}
	out = slices.Grow(out, fsproto.MaxSymlink+1)
	buf := out[len(out) : len(out)+fsproto.MaxSymlink+1]
	k, err := unix.Readlinkat(n.fd, "", buf)
	if err != nil {
		return out, toErrno(err)
	}
	if k > fsproto.MaxSymlink {
		return out, unix.ENAMETOOLONG
	}
	return out[:len(out)+k], 0
}

// makeNode creates a directory, symlink or special file.
func (s *Server) makeNode(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	dir, e := s.getDir(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(dir)
	perm := req.Mode & 0o7777
	var err error
	switch req.Op {
	case fsproto.OpMkdir:
		err = unix.Mkdirat(dir.fd, req.Name, perm)
	case fsproto.OpSymlink:
		err = unix.Symlinkat(req.Name2, dir.fd, req.Name)
	case fsproto.OpMknod:
		typ := req.Mode & unix.S_IFMT
		switch typ {
		case 0:
			typ = unix.S_IFREG
		case unix.S_IFREG, unix.S_IFIFO, unix.S_IFSOCK:
		case unix.S_IFCHR, unix.S_IFBLK:
			return out, unix.EPERM // no device nodes on the host (this includes whiteouts)
		default:
			return out, unix.EINVAL
		}
		err = unix.Mknodat(dir.fd, req.Name, typ|perm, 0)
	}
	if err != nil {
		return out, toErrno(err)
	}
	fd, err := lookupAt(dir.fd, req.Name)
	if err != nil {
		return out, toErrno(err)
	}
	if req.Op != fsproto.OpSymlink {
		s.fixMode(fd, perm)
	}
	return s.entryFd(fd, out)
}

// fixMode sets the permission bits the guest asked for when the host's
// umask took some away. fd is an O_PATH descriptor of a new inode.
func (s *Server) fixMode(fd int, perm uint32) {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return
	}
	typ := st.Mode & unix.S_IFMT
	if typ != unix.S_IFREG && typ != unix.S_IFDIR && typ != unix.S_IFIFO && typ != unix.S_IFSOCK {
		return
	}
	got := st.Mode & 0o7777
	want := perm
	if typ == unix.S_IFDIR {
		want |= got & unix.S_ISGID // inherited from a setgid parent
	}
	if got != want {
		unix.Fchmodat(s.procFd, procName(fd), want, 0)
	}
}

func (s *Server) remove(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	dir, e := s.getDir(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(dir)
	flags := 0
	if req.Op == fsproto.OpRmdir {
		flags = unix.AT_REMOVEDIR
	}
	return out, toErrno(unix.Unlinkat(dir.fd, req.Name, flags))
}

func (s *Server) rename(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	if req.OFlags&^(unix.RENAME_NOREPLACE|unix.RENAME_EXCHANGE) != 0 {
		return out, unix.EINVAL // RENAME_WHITEOUT would make a device node
	}
	from, e := s.getDir(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(from)
	to, e := s.getDir(req.Node2)
	if e != 0 {
		return out, e
	}
	defer s.putNode(to)
	return out, toErrno(unix.Renameat2(from.fd, req.Name, to.fd, req.Name2, uint(req.OFlags)))
}

// link makes a new name in directory Node2 for the inode of node Node. The
// source is a node, so it is an inode that was reached inside the share.
func (s *Server) link(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	if n.typ == unix.S_IFDIR {
		return out, unix.EPERM
	}
	dir, e := s.getDir(req.Node2)
	if e != 0 {
		return out, e
	}
	defer s.putNode(dir)
	// Through /proc/self/fd with AT_SYMLINK_FOLLOW: the magic link leads to
	// the node's own inode (a symlink node links the symlink itself, it is
	// not followed further). AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH.
	if err := unix.Linkat(s.procFd, procName(n.fd), dir.fd, req.Name, unix.AT_SYMLINK_FOLLOW); err != nil {
		return out, toErrno(err)
	}
	return s.entryAt(dir, req.Name, out)
}

// openFlags keeps the open(2) flags a guest may pass on.
func openFlags(f uint32) (int, unix.Errno) {
	acc := int(f & unix.O_ACCMODE)
	if acc == unix.O_ACCMODE {
		return 0, unix.EINVAL
	}
	return acc | int(f&(unix.O_APPEND|unix.O_TRUNC|unix.O_SYNC|unix.O_DSYNC)), 0
}

func (s *Server) open(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	var flags int
	dir := req.Op == fsproto.OpOpendir
	switch {
	case dir && n.typ != unix.S_IFDIR:
		return out, unix.ENOTDIR
	case dir:
		flags = unix.O_RDONLY | unix.O_DIRECTORY
	case n.typ == unix.S_IFDIR:
		return out, unix.EISDIR
	case n.typ != unix.S_IFREG:
		// FIFOs, sockets and devices are never opened on the host (the
		// guest kernel serves FIFOs itself; the mount is nodev).
		return out, unix.ENXIO
	default:
		if flags, e = openFlags(req.OFlags); e != 0 {
			return out, e
		}
	}
	fd, e := s.reopen(n, flags)
	if e != 0 {
		return out, e
	}
	fh, e := s.addHandle(fd, dir)
	if e != 0 {
		return out, e
	}
	return fsproto.AppendUint64(out, fh), 0
}

// create creates and opens a regular file. Its reply is entry | fh.
func (s *Server) create(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	dir, e := s.getDir(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(dir)
	flags, e := openFlags(req.OFlags)
	if e != 0 {
		return out, e
	}
	perm := req.Mode & 0o7777
	how := unix.OpenHow{
		Flags:   uint64(flags | unix.O_CREAT | unix.O_EXCL | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NOCTTY),
		Mode:    uint64(perm),
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	fd, err := unix.Openat2(dir.fd, req.Name, &how)
	if err == unix.EEXIST && req.OFlags&unix.O_EXCL == 0 {
		// An existing name: open it like OpOpen would, never through the
		// name (it may be a FIFO or device by now), only as a node.
		var n uint64
		fd, n, e = s.openExisting(dir, req.Name, flags)
		if e != 0 {
			return out, e
		}
		return s.createReply(req, fd, n, out)
	}
	if err != nil {
		return out, toErrno(err)
	}
	// The host's umask must not take bits away.
	var st0 unix.Stat_t
	if unix.Fstat(fd, &st0) == nil && st0.Mode&0o7777 != perm {
		unix.Fchmod(fd, perm)
	}
	// The node is the inode we just created, derived from its descriptor,
	// not looked up again by name.
	pfd, err := unix.Openat(s.procFd, procName(fd), unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd)
		return out, toErrno(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		unix.Close(pfd)
		unix.Close(fd)
		return out, toErrno(err)
	}
	id, e := s.addNode(pfd, &st)
	if e != 0 {
		unix.Close(fd)
		return out, e
	}
	return s.createReply(req, fd, id, out)
}

// openExisting opens the regular file name in dir via its node.
func (s *Server) openExisting(dir *node, name string, flags int) (int, uint64, unix.Errno) {
	pfd, err := lookupAt(dir.fd, name)
	if err != nil {
		return -1, 0, toErrno(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		unix.Close(pfd)
		return -1, 0, toErrno(err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		unix.Close(pfd)
		return -1, 0, unix.EISDIR
	default:
		unix.Close(pfd)
		return -1, 0, unix.EEXIST
	}
	id, e := s.addNode(pfd, &st)
	if e != 0 {
		return -1, 0, e
	}
	n, e := s.getNode(id)
	if e != 0 {
		return -1, 0, e
	}
	fd, e := s.reopen(n, flags)
	s.putNode(n)
	if e != 0 {
		s.forget(id, 1)
		return -1, 0, e
	}
	return fd, id, 0
}

// createReply registers fd as a handle (or, with FlagNoHandle, closes it)
// and appends entry | fh. On error the node's lookup reference is dropped
// again.
func (s *Server) createReply(req *fsproto.Request, fd int, id uint64, out []byte) ([]byte, unix.Errno) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		s.forget(id, 1)
		return out, toErrno(err)
	}
	var fh uint64
	if req.Flags&fsproto.FlagNoHandle != 0 {
		// Keep a writable descriptor as the node's: it was opened by the
		// create, which may write whatever the new file's mode (a file
		// made 0444, as git and tar do, could not be reopened for writing
		// by an unprivileged host user).
		if req.OFlags&unix.O_ACCMODE == unix.O_RDONLY || !s.adoptWriteFd(id, fd) {
			unix.Close(fd)
		}
	} else {
		var e unix.Errno
		if fh, e = s.addHandle(fd, false); e != 0 {
			s.forget(id, 1)
			return out, e
		}
	}
	a := toAttr(&st)
	out = fsproto.AppendEntry(out, id, &a)
	return fsproto.AppendUint64(out, fh), 0
}

func (s *Server) read(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	fd, _, done, e := s.openIO(req, ioRead)
	if e != 0 {
		return out, e
	}
	defer done()
	size := int(req.Size)
	var buf []byte
	if req.Flags&fsproto.FlagWindow != 0 {
		var w []byte
		if p := s.window.Load(); p != nil {
			w = *p
		}
		if req.Node2 > uint64(len(w)) || uint64(size) > uint64(len(w))-req.Node2 {
			return out, unix.EINVAL
		}
		buf = w[req.Node2 : req.Node2+uint64(size)]
	} else {
		out = slices.Grow(out, size)
		buf = out[len(out) : len(out)+size]
	}
	got := 0
	for got < size {
		k, err := unix.Pread(fd, buf[got:], int64(req.Off)+int64(got))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			if got > 0 {
				break
			}
			return out, toErrno(err)
		}
		if k == 0 {
			break
		}
		got += k
	}
	if req.Flags&fsproto.FlagWindow != 0 {
		s.windowReads.Add(1)
		return fsproto.AppendUint32(out, uint32(got)), 0
	}
	s.streamReads.Add(1)
	return out[:len(out)+got], 0
}

func (s *Server) write(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	fd, _, done, e := s.openIO(req, ioWrite)
	if e != 0 {
		return out, e
	}
	defer done()
	n := 0
	for n < len(req.Data) {
		// With O_APPEND, Linux pwrite appends whatever the offset.
		k, err := unix.Pwrite(fd, req.Data[n:], int64(req.Off)+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			if n > 0 {
				break
			}
			return out, toErrno(err)
		}
		n += k
	}
	return fsproto.AppendUint32(out, uint32(n)), 0
}

func (s *Server) fsync(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	kind := ioRead // fsync(2) works on a read-only descriptor too
	if req.Op == fsproto.OpFsyncdir {
		kind = ioDir
	}
	fd, _, done, e := s.openIO(req, kind)
	if e != 0 {
		return out, e
	}
	defer done()
	if req.Flags&fsproto.FlagDatasync != 0 {
		return out, toErrno(unix.Fdatasync(fd))
	}
	return out, toErrno(unix.Fsync(fd))
}

// readdir lists a directory handle from offset Off (a cookie of the host
// filesystem, 0 for the start), filling at most Size bytes of the guest
// kernel's buffer. With FlagPlus each entry but "." and ".." is looked up.
func (s *Server) readdir(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	fd, dirMu, done, e := s.openIO(req, ioDir)
	if e != 0 {
		return out, e
	}
	defer done()
	dirMu.Lock()
	defer dirMu.Unlock()
	if _, err := unix.Seek(fd, int64(req.Off), 0); err != nil {
		return out, toErrno(err)
	}
	plus := req.Flags&fsproto.FlagPlus != 0
	budget := int(req.Size)
	buf := make([]byte, 16<<10)
	for {
		k, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return out, toErrno(err)
		}
		if k <= 0 {
			return out, 0
		}
		for p := buf[:k]; len(p) >= 19; {
			// struct linux_dirent64 { u64 ino; s64 off; u16 reclen; u8 type; char name[]; }
			reclen := int(uint16(p[16]) | uint16(p[17])<<8)
			if reclen < 19 || reclen > len(p) {
				return out, unix.EIO
			}
			nameb := p[19:reclen]
			if i := slices.Index(nameb, 0); i >= 0 {
				nameb = nameb[:i]
			}
			d := fsproto.Dirent{
				Ino:  le64(p[0:]),
				Off:  le64(p[8:]),
				Type: p[18],
				Name: string(nameb),
			}
			p = p[reclen:]
			if len(d.Name) == 0 || len(d.Name) > fsproto.MaxName {
				continue
			}
			cost := fsproto.FuseDirentSize(len(d.Name), plus)
			if cost > budget {
				return out, 0
			}
			if plus && d.Name != "." && d.Name != ".." {
				s.direntEntry(fd, &d)
			}
			out = fsproto.AppendDirent(out, &d, plus)
			budget -= cost
		}
	}
}

// direntEntry looks up a readdirplus entry; on failure the entry goes out
// without a node (the guest kernel then ignores its attributes).
func (s *Server) direntEntry(dirfd int, d *fsproto.Dirent) {
	fd, err := lookupAt(dirfd, d.Name)
	if err != nil {
		return
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return
	}
	id, e := s.addNode(fd, &st)
	if e != 0 {
		return
	}
	d.Node, d.Attr = id, toAttr(&st)
	d.Type = uint8(st.Mode >> 12 & 0xf)
}

func le64(b []byte) uint64 {
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

func (s *Server) statfs(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	var sf unix.Statfs_t
	if err := unix.Fstatfs(n.fd, &sf); err != nil {
		return out, toErrno(err)
	}
	return fsproto.AppendStatfs(out, &fsproto.Statfs{
		Blocks: sf.Blocks, Bfree: sf.Bfree, Bavail: sf.Bavail, Files: sf.Files, Ffree: sf.Ffree,
		Bsize: uint32(sf.Bsize), NameLen: uint32(sf.Namelen), Frsize: uint32(sf.Frsize),
	}), 0
}

// xattrPrefix is the only namespace a guest may use: security.*, trusted.*
// and system.* could set capabilities, labels or ACLs on host files.
const xattrPrefix = "user."

func (s *Server) xattr(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	n, e := s.getNode(req.Node)
	if e != 0 {
		return out, e
	}
	defer s.putNode(n)
	allowed := strings.HasPrefix(req.Name, xattrPrefix)
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR {
		// Linux allows user.* only on files and directories; other
		// types are never reached through /proc (see reopen).
		switch req.Op {
		case fsproto.OpListxattr:
			return appendSized(out, nil, req.Size)
		case fsproto.OpGetxattr:
			return out, unix.ENODATA
		}
		return out, unix.EPERM
	}
	path := procPath(n.fd)
	switch req.Op {
	case fsproto.OpSetxattr:
		if !allowed {
			return out, unix.EPERM
		}
		if req.OFlags&^(unix.XATTR_CREATE|unix.XATTR_REPLACE) != 0 {
			return out, unix.EINVAL
		}
		return out, toErrno(unix.Setxattr(path, req.Name, req.Data, int(req.OFlags)))
	case fsproto.OpRemovexattr:
		if !allowed {
			return out, unix.EPERM
		}
		return out, toErrno(unix.Removexattr(path, req.Name))
	case fsproto.OpGetxattr:
		if !allowed {
			return out, unix.ENODATA
		}
		if req.Size == 0 {
			k, err := unix.Getxattr(path, req.Name, nil)
			if err != nil {
				return out, toErrno(err)
			}
			return fsproto.AppendUint32(out, uint32(min(k, fsproto.MaxXattrValue))), 0
		}
		out = slices.Grow(out, int(req.Size))
		k, err := unix.Getxattr(path, req.Name, out[len(out):len(out)+int(req.Size)])
		if err != nil {
			return out, toErrno(err)
		}
		return out[:len(out)+k], 0
	}
	// OpListxattr: the host's list, filtered to user.*.
	buf := make([]byte, fsproto.MaxXattrValue)
	k, err := unix.Listxattr(path, buf)
	if err == unix.ERANGE {
		return out, unix.E2BIG
	}
	if err != nil {
		return out, toErrno(err)
	}
	var list []byte
	for _, name := range strings.Split(string(buf[:k]), "\x00") {
		if strings.HasPrefix(name, xattrPrefix) {
			list = append(append(list, name...), 0)
		}
	}
	return appendSized(out, list, req.Size)
}

// appendSized answers a listxattr-style request: the size alone when the
// guest's buffer size is 0, ERANGE when data does not fit, else the data.
func appendSized(out, data []byte, size uint64) ([]byte, unix.Errno) {
	switch {
	case size == 0:
		return fsproto.AppendUint32(out, uint32(len(data))), 0
	case uint64(len(data)) > size:
		return out, unix.ERANGE
	}
	return append(out, data...), 0
}

func (s *Server) fallocate(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	const keep, punch, zero = unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_PUNCH_HOLE, unix.FALLOC_FL_ZERO_RANGE
	switch req.Mode {
	case 0, keep, punch | keep, zero, zero | keep:
	default:
		return out, unix.EOPNOTSUPP
	}
	if req.Off > 1<<62 || req.Size > 1<<62 {
		return out, unix.EFBIG
	}
	fd, _, done, e := s.openIO(req, ioWrite)
	if e != 0 {
		return out, e
	}
	defer done()
	return out, toErrno(unix.Fallocate(fd, req.Mode, int64(req.Off), int64(req.Size)))
}

func (s *Server) lseek(req *fsproto.Request, out []byte) ([]byte, unix.Errno) {
	if req.OFlags != unix.SEEK_DATA && req.OFlags != unix.SEEK_HOLE {
		return out, unix.EINVAL // the guest kernel seeks by itself otherwise
	}
	if req.Off > 1<<62 {
		return out, unix.ENXIO
	}
	fd, _, done, e := s.openIO(req, ioRead)
	if e != 0 {
		return out, e
	}
	defer done()
	off, err := unix.Seek(fd, int64(req.Off), int(req.OFlags))
	if err != nil {
		return out, toErrno(err)
	}
	return fsproto.AppendUint64(out, uint64(off)), 0
}
