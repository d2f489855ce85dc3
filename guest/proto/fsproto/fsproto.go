// Package fsproto is the wire format of matchlock's shared directories: the
// guest agent serves a FUSE mount by forwarding each filesystem request to
// the host, which executes it against the shared directory (package
// workspace). It uses the standard library and guest/proto only.
//
// One guest/proto stream carries one mount; the host opens it (kind
// "mount"). Records travel on the stream's channels, split so that bulk
// data never queues in front of small operations:
//
// I/O requests (read, write, fsync, fallocate, lseek, readdir) name a
// handle (Fh, from open, opendir or create) or, with Fh 0, only the node:
// the host then uses descriptors it keeps per node, which lets the guest
// kernel skip OPEN and RELEASE round trips altogether.
//
//	guest → host  ChanMeta  (0)  requests other than read and write
//	guest → host  ChanBulk  (2)  read and write requests
//	host → guest  ChanMetaReply (1)  replies to ChanMeta requests
//	host → guest  ChanBulkReply (3)  replies to ChanBulk requests
//
// Every channel has its own flow-control credit, so a guest that is slow to
// take 1 MiB read replies stalls only the bulk reply channel. Requests carry
// a tag chosen by the guest; replies carry it back and may come in any
// order. Forget, Release and Releasedir have no reply. The host may also
// send records with tag 0 on ChanMetaReply that answer nothing: change
// notifications (ReplyNotify).
//
// # Records
//
//	request = length u32 | tag u32 | op u8 | flags u8 | nameLen u16 | name2Len u16 | reserved u16 (0) | dataLen u32 |
//	          node u64 | node2 u64 | fh u64 | off u64 | size u64 |
//	          mode u32 | umask u32 | oflags u32 | valid u32 |
//	          atime i64 | atimeNsec u32 | mtime i64 | mtimeNsec u32 |
//	          name | name2 | data                                   (big-endian; length counts what follows it)
//	reply   = length u32 | tag u32 | errno u16 | flags u16 | body   (length = 8 + len(body))
//
// The head after the length is HeadSize bytes. Which fields an op reads,
// and the bounds on names and data, are in the table opSpecs; DecodeRequest
// rejects anything else. Reply bodies are fixed layouts written by the
// Append* functions below (attributes, entries, directory records). The
// replies of ops that change a directory end with its attributes after the
// change (see DirAttrs).
package fsproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"matchlock.dev/matchlock/guest/proto"
)

// Channels of a mount stream.
const (
	ChanMeta      = proto.Stdin
	ChanMetaReply = proto.Stdout
	ChanBulk      = proto.Stderr
	ChanBulkReply = proto.Aux
)

// Op is a filesystem operation.
type Op uint8

// Operations. The numbering is part of the wire format.
const (
	OpLookup Op = 1 + iota
	OpForget
	OpGetattr
	OpSetattr
	OpReadlink
	OpSymlink
	OpMknod
	OpMkdir
	OpUnlink
	OpRmdir
	OpRename
	OpLink
	OpOpen
	OpCreate
	OpRead
	OpWrite
	OpRelease
	OpFsync
	OpOpendir
	OpReaddir
	OpReleasedir
	OpFsyncdir
	OpStatfs
	OpSetxattr
	OpGetxattr
	OpListxattr
	OpRemovexattr
	OpFallocate
	OpLseek
	opEnd
)

var opNames = [...]string{"", "lookup", "forget", "getattr", "setattr", "readlink", "symlink", "mknod", "mkdir",
	"unlink", "rmdir", "rename", "link", "open", "create", "read", "write", "release", "fsync", "opendir",
	"readdir", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr", "listxattr", "removexattr",
	"fallocate", "lseek"}

func (o Op) String() string {
	if o > 0 && o < opEnd {
		return opNames[o]
	}
	return fmt.Sprintf("op%d", uint8(o))
}

// Bulk reports whether requests of this op travel on ChanBulk.
func (o Op) Bulk() bool { return o == OpRead || o == OpWrite }

// NoReply reports whether the host answers this op.
func (o Op) NoReply() bool { return o == OpForget || o == OpRelease || o == OpReleasedir }

// Request flags.
const (
	FlagFh       uint8 = 1 << 0 // getattr, setattr: Fh is valid
	FlagDatasync uint8 = 1 << 1 // fsync, fsyncdir: only data
	FlagPlus     uint8 = 1 << 2 // readdir: with entries (READDIRPLUS)
	FlagNoHandle uint8 = 1 << 3 // create: keep no handle, reply fh 0 (I/O then goes by node)
	// FlagWindow (read): the host writes the data into the mount's read
	// window (guest memory it maps, see proto.MountRequest.WindowSize) at
	// offset Node2 instead of into the reply, whose body is then the byte
	// count (u32). A host without a window answers EINVAL.
	FlagWindow uint8 = 1 << 4
	// FlagWatch (readdir): watch the directory for names changed on the
	// host (ReplyWatched, ReplyNotify).
	FlagWatch uint8 = 1 << 5
)

// MaxWindow bounds a mount's read window.
const MaxWindow = 1 << 30

// Setattr Valid bits.
const (
	SetMode     uint32 = 1 << 0
	SetSize     uint32 = 1 << 1
	SetAtime    uint32 = 1 << 2
	SetMtime    uint32 = 1 << 3
	SetAtimeNow uint32 = 1 << 4 // with SetAtime: the host's current time
	SetMtimeNow uint32 = 1 << 5
	setAll             = SetMode | SetSize | SetAtime | SetMtime | SetAtimeNow | SetMtimeNow
)

// Reply flags.
const (
	// ReplyPressure: the host holds many node references for this mount;
	// the guest should let its kernel forget unused inodes.
	ReplyPressure uint16 = 1 << 0
	// ReplyWatched (readdir with FlagWatch: its directory; mkdir: the new
	// one): the host watches the directory and will send a ReplyNotify
	// record for every name changed in it other than by this mount.
	ReplyWatched uint16 = 1 << 1
	// ReplyNotify marks a record that answers no request (tag 0) on
	// ChanMetaReply: body = directory node u64 | name. A name in that
	// directory was created, removed or moved on the host (name empty:
	// the directory itself went away); node 0: anything may have changed.
	ReplyNotify uint16 = 1 << 2
)

// Limits. Requests beyond them are malformed.
const (
	HeadSize       = 96       // request head after the length field
	ReplyHeadSize  = 8        // reply head after the length field
	MaxName        = 255      // a path component
	MaxSymlink     = 4095     // a symlink target
	MaxXattrName   = 255      // an extended attribute name
	MaxXattrValue  = 64 << 10 // an extended attribute value, and a listxattr reply
	MaxIO          = 1 << 20  // data of one read or write
	MaxReaddir     = 64 << 10 // the reply budget of one readdir
	MaxForget      = 1024     // (node, count) pairs in one forget
	ForgetItemSize = 16

	// MaxMetaRequest and MaxBulkRequest bound the length field on each
	// request channel.
	MaxMetaRequest = HeadSize + MaxXattrName + MaxSymlink + MaxXattrValue
	MaxBulkRequest = HeadSize + MaxIO
	// MaxMetaReply and MaxBulkReply bound the length field of replies.
	MaxMetaReply = ReplyHeadSize + MaxReaddir + 4096
	MaxBulkReply = ReplyHeadSize + MaxIO
)

// Timespec is a time with nanoseconds.
type Timespec struct {
	Sec  int64
	Nsec uint32
}

// Request is one decoded request. Which fields are meaningful depends on
// Op (see opSpecs); the others are carried but unused.
type Request struct {
	Tag   uint32
	Op    Op
	Flags uint8

	Node  uint64 // the inode the op is on, or the parent directory
	Node2 uint64 // rename: new parent; link: new parent; read with FlagWindow: window offset
	Fh    uint64
	Off   uint64
	Size  uint64 // read/readdir/getxattr/listxattr: reply budget; setattr: new size; fallocate: length

	Mode   uint32 // create/mkdir/mknod: type and permission bits; setattr: permission bits; fallocate: mode
	Umask  uint32
	OFlags uint32 // open/create: open(2) flags; rename: renameat2 flags; setxattr: XATTR_*; lseek: whence
	Valid  uint32 // setattr: Set* bits

	Atime, Mtime Timespec

	Name  string // lookup/create/…: a path component; xattr ops: the attribute name
	Name2 string // rename: the new name; symlink: the target
	Data  []byte // write: the bytes; setxattr: the value; forget: ForgetItemSize-byte items
}

// ErrMalformed matches every decoding error.
var ErrMalformed = errors.New("fsproto: malformed request")

type nameKind uint8

const (
	noName    nameKind = iota
	component          // 1..MaxName bytes, no '/', no NUL, not "." or ".."
	xattrName          // 1..MaxXattrName bytes, no NUL
	target             // 1..MaxSymlink bytes, no NUL
)

type opSpec struct {
	name, name2 nameKind
	maxData     int
	flags       uint8 // allowed flags
	maxSize     uint64
}

var opSpecs = [opEnd]opSpec{
	OpLookup:      {name: component},
	OpForget:      {maxData: MaxForget * ForgetItemSize},
	OpGetattr:     {flags: FlagFh},
	OpSetattr:     {flags: FlagFh, maxSize: 1<<63 - 1},
	OpReadlink:    {},
	OpSymlink:     {name: component, name2: target},
	OpMknod:       {name: component},
	OpMkdir:       {name: component},
	OpUnlink:      {name: component},
	OpRmdir:       {name: component},
	OpRename:      {name: component, name2: component},
	OpLink:        {name: component},
	OpOpen:        {},
	OpCreate:      {name: component, flags: FlagNoHandle},
	OpRead:        {flags: FlagWindow, maxSize: MaxIO},
	OpWrite:       {maxData: MaxIO},
	OpRelease:     {},
	OpFsync:       {flags: FlagDatasync},
	OpOpendir:     {},
	OpReaddir:     {flags: FlagPlus | FlagWatch, maxSize: MaxReaddir},
	OpReleasedir:  {},
	OpFsyncdir:    {flags: FlagDatasync},
	OpStatfs:      {},
	OpSetxattr:    {name: xattrName, maxData: MaxXattrValue},
	OpGetxattr:    {name: xattrName, maxSize: MaxXattrValue},
	OpListxattr:   {maxSize: MaxXattrValue},
	OpRemovexattr: {name: xattrName},
	OpFallocate:   {maxSize: 1<<63 - 1},
	OpLseek:       {},
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

// ValidName reports whether s may name a directory entry: 1 to MaxName
// bytes, no '/', no NUL, and neither "." nor "..".
func ValidName(s string) bool {
	return len(s) > 0 && len(s) <= MaxName && s != "." && s != ".." && !strings.ContainsAny(s, "/\x00")
}

func checkName(k nameKind, s string) bool {
	switch k {
	case noName:
		return s == ""
	case component:
		return ValidName(s)
	case xattrName:
		return len(s) > 0 && len(s) <= MaxXattrName && strings.IndexByte(s, 0) < 0
	case target:
		return len(s) > 0 && len(s) <= MaxSymlink && strings.IndexByte(s, 0) < 0
	}
	return false
}

var be = binary.BigEndian

// DecodeRequest parses and validates a request (the bytes after the length
// field). Data aliases b.
func DecodeRequest(b []byte) (*Request, error) {
	r := new(Request)
	if err := r.decode(b); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Request) decode(b []byte) error {
	if len(b) < HeadSize {
		return malformed("%d bytes, head is %d", len(b), HeadSize)
	}
	r.Tag = be.Uint32(b[0:])
	r.Op = Op(b[4])
	r.Flags = b[5]
	nameLen := int(be.Uint16(b[6:]))
	name2Len := int(be.Uint16(b[8:]))
	if be.Uint16(b[10:]) != 0 {
		return malformed("reserved field set")
	}
	dataLen := be.Uint32(b[12:])
	r.Node = be.Uint64(b[16:])
	r.Node2 = be.Uint64(b[24:])
	r.Fh = be.Uint64(b[32:])
	r.Off = be.Uint64(b[40:])
	r.Size = be.Uint64(b[48:])
	r.Mode = be.Uint32(b[56:])
	r.Umask = be.Uint32(b[60:])
	r.OFlags = be.Uint32(b[64:])
	r.Valid = be.Uint32(b[68:])
	r.Atime = Timespec{int64(be.Uint64(b[72:])), be.Uint32(b[80:])}
	r.Mtime = Timespec{int64(be.Uint64(b[84:])), be.Uint32(b[92:])}
	if r.Op == 0 || r.Op >= opEnd {
		return malformed("unknown op %d", b[4])
	}
	if uint64(len(b)-HeadSize) != uint64(nameLen)+uint64(name2Len)+uint64(dataLen) {
		return malformed("%s: lengths %d+%d+%d do not add up to %d", r.Op, nameLen, name2Len, dataLen, len(b)-HeadSize)
	}
	if int64(dataLen) > int64(opSpecs[r.Op].maxData) || nameLen > MaxSymlink || name2Len > MaxSymlink {
		return malformed("%s: %d/%d/%d bytes of names and data", r.Op, nameLen, name2Len, dataLen)
	}
	p := b[HeadSize:]
	r.Name = string(p[:nameLen])
	r.Name2 = string(p[nameLen : nameLen+name2Len])
	r.Data = p[nameLen+name2Len:]
	if len(r.Data) == 0 {
		r.Data = nil
	}
	return r.Validate()
}

// Validate checks r against its op's rules: known op, allowed flags,
// names, sizes and data. DecodeRequest calls it; the host calls it again
// before executing a request however it was made.
func (r *Request) Validate() error {
	if r.Op == 0 || r.Op >= opEnd {
		return malformed("unknown op %d", r.Op)
	}
	spec := opSpecs[r.Op]
	if r.Flags&^spec.flags != 0 {
		return malformed("%s: flags %#x", r.Op, r.Flags)
	}
	if len(r.Data) > spec.maxData {
		return malformed("%s: %d data bytes", r.Op, len(r.Data))
	}
	if r.Size > spec.maxSize {
		return malformed("%s: size %d", r.Op, r.Size)
	}
	if r.Atime.Nsec >= 1e9 || r.Mtime.Nsec >= 1e9 {
		return malformed("%s: nanoseconds out of range", r.Op)
	}
	if !checkName(spec.name, r.Name) || !checkName(spec.name2, r.Name2) {
		return malformed("%s: bad name", r.Op)
	}
	switch r.Op {
	case OpForget:
		if len(r.Data)%ForgetItemSize != 0 || len(r.Data) == 0 {
			return malformed("forget: %d data bytes", len(r.Data))
		}
	case OpSetattr:
		if r.Valid&^setAll != 0 {
			return malformed("setattr: valid %#x", r.Valid)
		}
	case OpRead:
		if r.Flags&FlagWindow != 0 && r.Node2 > MaxWindow {
			return malformed("read: window offset %d", r.Node2)
		}
	}
	return nil
}

// AppendRequest appends r's record (length field included) to dst. It
// does not validate r.
func AppendRequest(dst []byte, r *Request) []byte {
	return append(AppendRequestHead(dst, r, len(r.Data)), r.Data...)
}

// AppendRequestHead appends the length field, head and names of r's
// record for dataLen bytes of data, which the caller writes next (so that
// bulk data need not be copied into the record).
func AppendRequestHead(dst []byte, r *Request, dataLen int) []byte {
	dst = be.AppendUint32(dst, uint32(HeadSize+len(r.Name)+len(r.Name2)+dataLen))
	dst = be.AppendUint32(dst, r.Tag)
	dst = append(dst, byte(r.Op), r.Flags)
	dst = be.AppendUint16(dst, uint16(len(r.Name)))
	dst = be.AppendUint16(dst, uint16(len(r.Name2)))
	dst = be.AppendUint16(dst, 0)
	dst = be.AppendUint32(dst, uint32(dataLen))
	for _, v := range []uint64{r.Node, r.Node2, r.Fh, r.Off, r.Size} {
		dst = be.AppendUint64(dst, v)
	}
	for _, v := range []uint32{r.Mode, r.Umask, r.OFlags, r.Valid} {
		dst = be.AppendUint32(dst, v)
	}
	dst = be.AppendUint64(dst, uint64(r.Atime.Sec))
	dst = be.AppendUint32(dst, r.Atime.Nsec)
	dst = be.AppendUint64(dst, uint64(r.Mtime.Sec))
	dst = be.AppendUint32(dst, r.Mtime.Nsec)
	dst = append(dst, r.Name...)
	return append(dst, r.Name2...)
}

// ForgetItem is one (node, lookup count) pair of a forget request.
type ForgetItem struct {
	Node, Count uint64
}

// AppendForget appends a forget item to a forget request's data.
func AppendForget(dst []byte, it ForgetItem) []byte {
	dst = be.AppendUint64(dst, it.Node)
	return be.AppendUint64(dst, it.Count)
}

// Forgets decodes a forget request's data (validated by DecodeRequest).
func Forgets(data []byte, f func(ForgetItem)) {
	for len(data) >= ForgetItemSize {
		f(ForgetItem{be.Uint64(data), be.Uint64(data[8:])})
		data = data[ForgetItemSize:]
	}
}

// AppendReplyHead appends a reply's length field and head for a body of
// bodyLen bytes.
func AppendReplyHead(dst []byte, tag uint32, errno uint16, flags uint16, bodyLen int) []byte {
	dst = be.AppendUint32(dst, uint32(ReplyHeadSize+bodyLen))
	dst = be.AppendUint32(dst, tag)
	dst = be.AppendUint16(dst, errno)
	return be.AppendUint16(dst, flags)
}

// ReplyHead is a decoded reply head.
type ReplyHead struct {
	Tag     uint32
	Errno   uint16
	Flags   uint16
	BodyLen int
}

// DecodeReplyHead parses the 4+ReplyHeadSize bytes that start a reply.
func DecodeReplyHead(b []byte, max int) (ReplyHead, error) {
	if len(b) < 4+ReplyHeadSize {
		return ReplyHead{}, errors.New("fsproto: short reply head")
	}
	n := be.Uint32(b)
	if n < ReplyHeadSize || n > uint32(max) {
		return ReplyHead{}, fmt.Errorf("fsproto: reply length %d", n)
	}
	return ReplyHead{Tag: be.Uint32(b[4:]), Errno: be.Uint16(b[8:]), Flags: be.Uint16(b[10:]), BodyLen: int(n) - ReplyHeadSize}, nil
}

// Attr is a file's attributes as the host reports them. Owners are not
// sent: the guest shows every file as owned by the mount's owner.
type Attr struct {
	Ino, Size, Blocks      uint64
	Atime, Mtime, Ctime    Timespec
	Mode, Nlink, Rdev, Blk uint32
}

// AttrSize is the encoded size of an Attr.
const AttrSize = 3*8 + 3*12 + 4*4

// AppendAttr appends a.
func AppendAttr(dst []byte, a *Attr) []byte {
	dst = be.AppendUint64(dst, a.Ino)
	dst = be.AppendUint64(dst, a.Size)
	dst = be.AppendUint64(dst, a.Blocks)
	for _, t := range []Timespec{a.Atime, a.Mtime, a.Ctime} {
		dst = be.AppendUint64(dst, uint64(t.Sec))
		dst = be.AppendUint32(dst, t.Nsec)
	}
	for _, v := range []uint32{a.Mode, a.Nlink, a.Rdev, a.Blk} {
		dst = be.AppendUint32(dst, v)
	}
	return dst
}

// DecodeAttr parses an Attr from the start of b.
func DecodeAttr(b []byte) (Attr, bool) {
	if len(b) < AttrSize {
		return Attr{}, false
	}
	var a Attr
	a.Ino, a.Size, a.Blocks = be.Uint64(b), be.Uint64(b[8:]), be.Uint64(b[16:])
	p := b[24:]
	for _, t := range []*Timespec{&a.Atime, &a.Mtime, &a.Ctime} {
		*t = Timespec{int64(be.Uint64(p)), be.Uint32(p[8:])}
		p = p[12:]
	}
	a.Mode, a.Nlink, a.Rdev, a.Blk = be.Uint32(p), be.Uint32(p[4:]), be.Uint32(p[8:]), be.Uint32(p[12:])
	return a, true
}

// EntrySize is the encoded size of an entry: node u64 | Attr. Node 0 is a
// name without a node (a negative lookup, or "." in a readdir).
const EntrySize = 8 + AttrSize

// AppendEntry appends an entry.
func AppendEntry(dst []byte, node uint64, a *Attr) []byte {
	return AppendAttr(be.AppendUint64(dst, node), a)
}

// DecodeEntry parses an entry from the start of b.
func DecodeEntry(b []byte) (node uint64, a Attr, ok bool) {
	if len(b) < EntrySize {
		return 0, Attr{}, false
	}
	a, ok = DecodeAttr(b[8:])
	return be.Uint64(b), a, ok
}

// Dirent is one directory record of a readdir reply:
//
//	ino u64 | off u64 | type u8 (mode>>12) | nameLen u8 | name | [entry, with FlagPlus]
type Dirent struct {
	Ino  uint64
	Off  uint64 // the offset of the next record
	Type uint8
	Name string
	// With FlagPlus:
	Node uint64
	Attr Attr
}

// AppendDirent appends d; plus adds its entry.
func AppendDirent(dst []byte, d *Dirent, plus bool) []byte {
	dst = be.AppendUint64(dst, d.Ino)
	dst = be.AppendUint64(dst, d.Off)
	dst = append(dst, d.Type, byte(len(d.Name)))
	dst = append(dst, d.Name...)
	if plus {
		dst = AppendEntry(dst, d.Node, &d.Attr)
	}
	return dst
}

// DecodeDirents parses a readdir reply body.
func DecodeDirents(b []byte, plus bool, f func(*Dirent) bool) error {
	var d Dirent
	for len(b) > 0 {
		if len(b) < 18 {
			return errors.New("fsproto: short dirent")
		}
		d = Dirent{Ino: be.Uint64(b), Off: be.Uint64(b[8:]), Type: b[16]}
		n := int(b[17])
		b = b[18:]
		if len(b) < n || n == 0 {
			return errors.New("fsproto: bad dirent name")
		}
		d.Name = string(b[:n])
		b = b[n:]
		if plus {
			var ok bool
			if d.Node, d.Attr, ok = DecodeEntry(b); !ok {
				return errors.New("fsproto: short dirent entry")
			}
			b = b[EntrySize:]
		}
		if !f(&d) {
			return nil
		}
	}
	return nil
}

// FuseDirentSize is what a directory record of this name length costs in
// the guest kernel's readdir buffer (struct fuse_dirent, or fuse_direntplus
// with plus): the host fills a readdir reply up to the kernel's budget.
func FuseDirentSize(nameLen int, plus bool) int {
	n := 24 + (nameLen+7)&^7
	if plus {
		n += 128 // struct fuse_entry_out
	}
	return n
}

// Statfs is the reply to OpStatfs.
type Statfs struct {
	Blocks, Bfree, Bavail, Files, Ffree uint64
	Bsize, NameLen, Frsize              uint32
}

// StatfsSize is the encoded size of a Statfs.
const StatfsSize = 5*8 + 3*4

// AppendStatfs appends s.
func AppendStatfs(dst []byte, s *Statfs) []byte {
	for _, v := range []uint64{s.Blocks, s.Bfree, s.Bavail, s.Files, s.Ffree} {
		dst = be.AppendUint64(dst, v)
	}
	for _, v := range []uint32{s.Bsize, s.NameLen, s.Frsize} {
		dst = be.AppendUint32(dst, v)
	}
	return dst
}

// DecodeStatfs parses a Statfs.
func DecodeStatfs(b []byte) (Statfs, bool) {
	if len(b) < StatfsSize {
		return Statfs{}, false
	}
	return Statfs{be.Uint64(b), be.Uint64(b[8:]), be.Uint64(b[16:]), be.Uint64(b[24:]), be.Uint64(b[32:]),
		be.Uint32(b[40:]), be.Uint32(b[44:]), be.Uint32(b[48:])}, true
}

// Uint64 and Uint32 read reply scalars (fh, offsets, sizes); ok is false
// when b is too short.
func Uint64(b []byte) (uint64, bool) {
	if len(b) < 8 {
		return 0, false
	}
	return be.Uint64(b), true
}

// Uint32 reads a 32-bit reply scalar.
func Uint32(b []byte) (uint32, bool) {
	if len(b) < 4 {
		return 0, false
	}
	return be.Uint32(b), true
}

// AppendUint64 and AppendUint32 write reply scalars.
func AppendUint64(dst []byte, v uint64) []byte { return be.AppendUint64(dst, v) }

// AppendUint32 writes a 32-bit reply scalar.
func AppendUint32(dst []byte, v uint32) []byte { return be.AppendUint32(dst, v) }

// DirAttrs returns how many directory attributes end a successful reply to
// op: those of the directory it changed (Node; Node2 for link), and for
// rename of both directories (Node, then Node2).
func DirAttrs(op Op) int {
	switch op {
	case OpSymlink, OpMknod, OpMkdir, OpCreate, OpUnlink, OpRmdir, OpLink:
		return 1
	case OpRename:
		return 2
	}
	return 0
}
