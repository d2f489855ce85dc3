package workspace

import (
	"sync"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// getNode returns node id with a reference that keeps its descriptor open;
// the caller must putNode it.
func (s *Server) getNode(id uint64) (*node, unix.Errno) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, unix.EIO
	}
	n := s.nodes[id]
	if n == nil {
		return nil, unix.ESTALE
	}
	n.refs++
	return n, 0
}

// getDir is getNode for a node that must be a directory.
func (s *Server) getDir(id uint64) (*node, unix.Errno) {
	n, e := s.getNode(id)
	if e != 0 {
		return nil, e
	}
	if n.typ != unix.S_IFDIR {
		s.putNode(n)
		return nil, unix.ENOTDIR
	}
	return n, 0
}

func (s *Server) putNode(n *node) {
	s.mu.Lock()
	n.refs--
	if n.dead && n.refs == 0 {
		s.closeNodeLocked(n)
	}
	s.mu.Unlock()
}

func (s *Server) closeNodeLocked(n *node) {
	for i, v := range n.iofd {
		if v != 0 {
			closeFd(v - 1)
			n.iofd[i] = 0
		}
	}
	if n.fd >= 0 {
		if n.id == RootNode {
			unix.Close(n.fd) // not counted in fdsHeld
		} else {
			closeFd(n.fd)
		}
		n.fd = -1
	}
}

// addNode records a lookup of the inode open as fd (an O_PATH descriptor
// that the caller passes on) and returns its node with one more lookup
// reference. A known inode keeps its node: fd is then closed.
func (s *Server) addNode(fd int, st *unix.Stat_t) (uint64, unix.Errno) {
	key := inoKey{st.Dev, st.Ino}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		unix.Close(fd)
		return 0, unix.EIO
	}
	if n := s.byIno[key]; n != nil {
		unix.Close(fd)
		n.nlookup++
		return n.id, 0
	}
	if len(s.nodes) >= s.cfg.MaxNodes || fdsHeld.Load() >= fdBudget() {
		unix.Close(fd)
		return 0, unix.ENFILE
	}
	fdsHeld.Add(1)
	n := &node{id: s.nextNode, fd: fd, typ: st.Mode & unix.S_IFMT, key: key, nlookup: 1}
	s.nextNode++
	s.nodes[n.id] = n
	s.byIno[key] = n
	return n.id, 0
}

// forget drops count lookup references of node id. The root is never
// forgotten; unknown nodes are ignored (the kernel may forget a node
// whose lookup reply we never sent).
func (s *Server) forget(id, count uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.nodes[id]
	if n == nil || id == RootNode {
		return
	}
	if count >= n.nlookup {
		n.nlookup = 0
	} else {
		n.nlookup -= count
		return
	}
	delete(s.nodes, id)
	if s.byIno[n.key] == n {
		delete(s.byIno, n.key)
	}
	s.w.unwatch(id)
	n.dead = true
	if n.refs == 0 {
		s.closeNodeLocked(n)
	}
}

// addHandle registers an open descriptor (passed on by the caller).
func (s *Server) addHandle(fd int, dir bool) (uint64, unix.Errno) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		unix.Close(fd)
		return 0, unix.EIO
	}
	if len(s.handles) >= s.cfg.MaxHandles || fdsHeld.Load() >= fdBudget() {
		unix.Close(fd)
		return 0, unix.EMFILE
	}
	fdsHeld.Add(1)
	fh := s.nextFh
	s.nextFh++
	s.handles[fh] = &handle{fd: fd, dir: dir}
	return fh, 0
}

// getHandle returns handle fh, which must be a directory handle if dir
// (and a file handle otherwise), with a reference; putHandle releases it.
func (s *Server) getHandle(fh uint64, dir bool) (*handle, unix.Errno) {
	h, e := s.getAnyHandle(fh)
	if e != 0 {
		return nil, e
	}
	if h.dir != dir {
		s.putHandle(h)
		return nil, unix.EBADF
	}
	return h, 0
}

func (s *Server) getAnyHandle(fh uint64) (*handle, unix.Errno) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, unix.EIO
	}
	h := s.handles[fh]
	if h == nil {
		return nil, unix.EBADF
	}
	h.refs++
	return h, 0
}

func (s *Server) putHandle(h *handle) {
	s.mu.Lock()
	h.refs--
	if h.dead && h.refs == 0 {
		closeFd(h.fd)
	}
	s.mu.Unlock()
}

// release closes handle fh once no request uses it.
func (s *Server) release(fh uint64, dir bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.handles[fh]
	if h == nil || h.dir != dir {
		return
	}
	delete(s.handles, fh)
	h.dead = true
	if h.refs == 0 {
		closeFd(h.fd)
	}
}

// openIO returns the descriptor req's I/O uses: its handle's when it names
// one (Fh), else one its node keeps, opened on first use. done must be
// called after the I/O; dirMu serialises positioned directory reads.
func (s *Server) openIO(req *fsproto.Request, kind ioKind) (fd int, dirMu *sync.Mutex, done func(), e unix.Errno) {
	if req.Fh != 0 {
		h, e := s.getHandle(req.Fh, kind == ioDir)
		if e != 0 {
			return -1, nil, nil, e
		}
		return h.fd, &h.dirMu, func() { s.putHandle(h) }, 0
	}
	n, e := s.getNode(req.Node)
	if e != 0 {
		return -1, nil, nil, e
	}
	switch {
	case kind == ioDir && n.typ != unix.S_IFDIR:
		e = unix.ENOTDIR
	case kind != ioDir && n.typ == unix.S_IFDIR:
		e = unix.EISDIR
	case kind != ioDir && n.typ != unix.S_IFREG:
		e = unix.ENXIO // never open FIFOs, sockets or devices on the host
	}
	if e == 0 {
		fd, e = s.nodeFd(n, kind)
	}
	if e != 0 {
		s.putNode(n)
		return -1, nil, nil, e
	}
	return fd, &n.dirMu, func() { s.putNode(n) }, 0
}

// nodeFd opens (once) n's descriptor of this kind. The caller holds a
// reference on n and checked its type.
func (s *Server) nodeFd(n *node, kind ioKind) (int, unix.Errno) {
	n.ioMu.Lock()
	defer n.ioMu.Unlock()
	if v := n.iofd[kind]; v != 0 {
		return v - 1, 0
	}
	flags := unix.O_RDONLY
	switch kind {
	case ioWrite:
		if s.cfg.ReadOnly {
			return -1, unix.EROFS
		}
		flags = unix.O_WRONLY
	case ioDir:
		flags = unix.O_RDONLY | unix.O_DIRECTORY
	}
	if fdsHeld.Load() >= fdBudget() {
		return -1, unix.EMFILE
	}
	fd, e := s.reopen(n, flags)
	if e != 0 {
		return -1, e
	}
	fdsHeld.Add(1)
	n.iofd[kind] = fd + 1
	return fd, 0
}

// adoptWriteFd makes fd (opened for writing by a create) node id's write
// descriptor, unless it has one. O_APPEND is cleared: offsets come from the
// guest kernel.
func (s *Server) adoptWriteFd(id uint64, fd int) bool {
	n, e := s.getNode(id)
	if e != 0 {
		return false
	}
	defer s.putNode(n)
	n.ioMu.Lock()
	defer n.ioMu.Unlock()
	if n.iofd[ioWrite] != 0 {
		return false
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return false
	}
	if fl&unix.O_APPEND != 0 {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_APPEND); err != nil {
			return false
		}
	}
	fdsHeld.Add(1)
	n.iofd[ioWrite] = fd + 1
	return true
}
