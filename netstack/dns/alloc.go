package dns

import (
	"container/list"
	"errors"
	"net/netip"
	"sync"

	"matchlock.dev/matchlock/netstack/policy"
)

// DefaultMaxNames bounds how many names one sandbox's Allocator maps at
// once. Past it the least recently used name loses its address (a guest that
// cached it gets a refused connection and asks again).
const DefaultMaxNames = 8192

// Allocator hands out one synthetic IPv4 address per name from a prefix
// (policy.SyntheticPrefix by default) and maps addresses back to names. A
// name keeps its address as long as it stays mapped. Addresses are handed
// out in order and wrap around, so a freed address is reused as late as
// possible. It is safe for concurrent use.
type Allocator struct {
	base  uint32 // first address of the prefix
	size  uint32 // number of addresses in the prefix
	max   int
	mu    sync.Mutex
	next  uint32                   // guarded by mu; offset tried first
	names map[string]*list.Element // guarded by mu
	addrs map[uint32]*list.Element // guarded by mu; key: offset
	lru   *list.List               // guarded by mu; front = most recent; values *allocEntry
}

type allocEntry struct {
	name string
	off  uint32
}

// NewAllocator returns an Allocator over prefix (an IPv4 prefix of /8 to
// /30) holding at most maxNames names (DefaultMaxNames if <= 0). The first
// and last address of the prefix are never handed out.
func NewAllocator(prefix netip.Prefix, maxNames int) (*Allocator, error) {
	if !prefix.IsValid() || !prefix.Addr().Is4() || prefix.Bits() < 8 || prefix.Bits() > 30 || prefix.Masked() != prefix {
		return nil, errors.New("dns: allocator prefix must be a masked IPv4 prefix of /8 to /30")
	}
	size := uint32(1) << (32 - prefix.Bits())
	if maxNames <= 0 {
		maxNames = DefaultMaxNames
	}
	if uint32(maxNames) > size-2 {
		maxNames = int(size - 2)
	}
	b := prefix.Addr().As4()
	return &Allocator{
		base:  uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]),
		size:  size,
		max:   maxNames,
		next:  1,
		names: make(map[string]*list.Element),
		addrs: make(map[uint32]*list.Element),
		lru:   list.New(),
	}, nil
}

// NewSyntheticAllocator returns an Allocator over policy.SyntheticPrefix
// with DefaultMaxNames.
func NewSyntheticAllocator() *Allocator {
	a, err := NewAllocator(policy.SyntheticPrefix, 0)
	if err != nil {
		panic(err)
	}
	return a
}

func (a *Allocator) addr(off uint32) netip.Addr {
	v := a.base + off
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Assign returns the address of name, giving it one if it has none. name
// should be canonical (policy.CanonicalName); Assign does not check it.
func (a *Allocator) Assign(name string) netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	if el, ok := a.names[name]; ok {
		a.lru.MoveToFront(el)
		return a.addr(el.Value.(*allocEntry).off)
	}
	if a.lru.Len() >= a.max {
		old := a.lru.Back()
		e := old.Value.(*allocEntry)
		a.lru.Remove(old)
		delete(a.names, e.name)
		delete(a.addrs, e.off)
	}
	// max <= size-2, so a free offset exists among 1..size-2.
	off := a.next
	for {
		if off < 1 || off > a.size-2 {
			off = 1
		}
		if _, used := a.addrs[off]; !used {
			break
		}
		off++
	}
	a.next = off + 1
	el := a.lru.PushFront(&allocEntry{name: name, off: off})
	a.names[name] = el
	a.addrs[off] = el
	return a.addr(off)
}

// Lookup returns the name an address was assigned to.
func (a *Allocator) Lookup(ip netip.Addr) (string, bool) {
	ip = ip.Unmap()
	if !ip.Is4() {
		return "", false
	}
	b := ip.As4()
	off := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) - a.base
	if off >= a.size {
		return "", false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	el, ok := a.addrs[off]
	if !ok {
		return "", false
	}
	a.lru.MoveToFront(el)
	return el.Value.(*allocEntry).name, true
}

// Len returns the number of names mapped.
func (a *Allocator) Len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lru.Len()
}
