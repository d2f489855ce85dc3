package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"matchlock.dev/matchlock/sandbox"
)

type createParams struct {
	Image        string            `json:"image"`
	CPUs         int               `json:"cpus"`
	MemoryMiB    int               `json:"memory_mib"`
	DiskSizeMiB  int               `json:"disk_size_mib"`
	Env          map[string]string `json:"env"`
	Workdir      string            `json:"workdir"`
	User         string            `json:"user"`
	Hostname     string            `json:"hostname"`
	AllowHosts   []string          `json:"allow_hosts"`
	AllowPrivate []string          `json:"allow_private"`
	NoNetwork    bool              `json:"no_network"`
	Secrets      []secretParam     `json:"secrets"`
	Mounts       []mountParam      `json:"mounts"`
}

// mountParam is a host directory (host_path) or a named volume (volume)
// mounted at guest_path.
type mountParam struct {
	GuestPath string `json:"guest_path"`
	HostPath  string `json:"host_path"`
	Volume    string `json:"volume"`
	Mode      string `json:"mode"`     // host_path: "rw" (default), "ro" or "overlay"
	ReadOnly  bool   `json:"readonly"` // shorthand for mode "ro"; for volumes, attach read-only
	Owner     string `json:"owner"`    // host_path: who the files appear owned by in the guest
}

type secretParam struct {
	Name  string   `json:"name"`
	Value string   `json:"value"`
	Hosts []string `json:"hosts"`
}

type imageInfo struct {
	Entrypoint []string `json:"entrypoint"`
	Cmd        []string `json:"cmd"`
	Env        []string `json:"env"`
	Workdir    string   `json:"workdir"`
	User       string   `json:"user"`
}

type createResult struct {
	ID              string    `json:"id"`
	ProtocolVersion int       `json:"protocol_version"`
	Image           imageInfo `json:"image"`
}

func (p *createParams) validate() *Error {
	bad := func(format string, args ...any) *Error {
		return errorf(CodeInvalidParams, "invalid params: "+format, args...)
	}
	switch {
	case p.Image == "":
		return bad(`"image" is required (for example "alpine:latest")`)
	case p.CPUs < 0 || p.CPUs > 64:
		return bad(`"cpus" %d: want 1 to 64`, p.CPUs)
	case p.MemoryMiB != 0 && (p.MemoryMiB < 64 || p.MemoryMiB > 1<<20):
		return bad(`"memory_mib" %d: want 64 to 1048576`, p.MemoryMiB)
	case p.DiskSizeMiB != 0 && (p.DiskSizeMiB < 16 || p.DiskSizeMiB > 16<<20):
		return bad(`"disk_size_mib" %d: want 16 to 16777216`, p.DiskSizeMiB)
	case p.Hostname != "" && !validHostname(p.Hostname):
		return bad(`"hostname" %q: want letters, digits and '-', at most 63`, p.Hostname)
	case p.NoNetwork && (len(p.AllowHosts) > 0 || len(p.AllowPrivate) > 0):
		return bad(`"no_network" excludes "allow_hosts" and "allow_private"`)
	case p.NoNetwork && len(p.Secrets) > 0:
		return bad(`"no_network" excludes "secrets" (they are injected on the network)`)
	}
	if err := validEnv("env", p.Env); err != nil {
		return err
	}
	seen := map[string]bool{}
	for i, sec := range p.Secrets {
		if !validEnvName(sec.Name) {
			return bad(`"secrets"[%d].name %q: want an environment variable name`, i, sec.Name)
		}
		if seen[sec.Name] {
			return bad(`"secrets": %s given twice`, sec.Name)
		}
		seen[sec.Name] = true
	}
	for i, m := range p.Mounts {
		if err := m.validate(); err != "" {
			return bad(`"mounts"[%d]: %s`, i, err)
		}
	}
	return nil
}

func (m *mountParam) validate() string {
	switch {
	case !strings.HasPrefix(m.GuestPath, "/"):
		return `"guest_path" must be an absolute guest path`
	case (m.HostPath == "") == (m.Volume == ""):
		return `give "host_path" (a host directory) or "volume" (a volume name), not both`
	case m.HostPath != "" && !strings.HasPrefix(m.HostPath, "/"):
		return `"host_path" must be an absolute host path`
	case m.Volume != "" && (m.Mode != "" || m.Owner != ""):
		return `"mode" and "owner" are for host_path mounts; a volume takes "readonly"`
	case m.Mode != "" && m.Mode != sandbox.MountReadWrite && m.Mode != sandbox.MountReadOnly && m.Mode != sandbox.MountOverlay:
		return fmt.Sprintf(`"mode" %q: want "rw", "ro" or "overlay"`, m.Mode)
	case m.ReadOnly && m.Mode != "" && m.Mode != sandbox.MountReadOnly:
		return fmt.Sprintf(`"readonly" contradicts "mode" %q`, m.Mode)
	}
	return ""
}

func validHostname(h string) bool {
	if len(h) > 63 || h[0] == '-' {
		return false
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func validEnvName(n string) bool {
	if n == "" || n[0] >= '0' && n[0] <= '9' {
		return false
	}
	for _, c := range n {
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

func handleCreate(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	var p createParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	if err := p.validate(); err != nil {
		return nil, err
	}
	images := s.cfg.Images
	if images == nil {
		if DefaultImages == nil {
			return nil, errorf(CodeSandboxError, "no image store configured")
		}
		var err error
		if images, err = DefaultImages(); err != nil {
			return nil, fmt.Errorf("image store: %w", err)
		}
	}

	s.mu.Lock()
	switch {
	case s.closing:
		s.mu.Unlock()
		return nil, errSessionEnded
	case len(s.sandboxes)+s.creating >= s.cfg.MaxSandboxes:
		s.mu.Unlock()
		return nil, errorf(CodeLimit, "too many sandboxes in this session (limit %d): close one first", s.cfg.MaxSandboxes)
	}
	s.creating++
	s.mu.Unlock()

	opts := sandbox.Options{
		Image: p.Image, Images: images,
		Kernel: s.cfg.Kernel, Agent: s.cfg.Agent, Accel: s.cfg.Accel,
		CPUs: p.CPUs, MemoryMiB: p.MemoryMiB, DiskSizeMiB: p.DiskSizeMiB, Hostname: p.Hostname,
		NoNetwork: p.NoNetwork, AllowHosts: p.AllowHosts, AllowPrivate: p.AllowPrivate,
		Notice: func(msg string) { fmt.Fprintln(s.cfg.Log, "matchlock: "+msg) },
	}
	for _, sec := range p.Secrets {
		opts.Secrets = append(opts.Secrets, sandbox.Secret{Name: sec.Name, Value: sec.Value, Hosts: sec.Hosts})
	}
	for _, m := range p.Mounts {
		if m.Volume != "" {
			opts.Volumes = append(opts.Volumes, sandbox.VolumeMount{Name: m.Volume, Target: m.GuestPath, ReadOnly: m.ReadOnly})
			continue
		}
		mode := m.Mode
		if m.ReadOnly {
			mode = sandbox.MountReadOnly
		}
		opts.Mounts = append(opts.Mounts, sandbox.Mount{Source: m.HostPath, Target: m.GuestPath, Mode: mode, Owner: m.Owner})
	}
	sb, err := s.cfg.NewSandbox(ctx, opts)

	s.mu.Lock()
	s.creating--
	if err == nil && (s.closing || ctx.Err() != nil) {
		// Booted just as the session ended or the request was cancelled.
		s.mu.Unlock()
		sb.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, errSessionEnded
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	e := &entry{sb: sb, opts: p}
	e.ctx, e.cancel = context.WithCancelCause(s.ctx)
	s.sandboxes[sb.ID()] = e
	s.wg.Add(1)
	s.mu.Unlock()
	go s.watch(e)

	img := sb.ImageConfig()
	return &createResult{ID: sb.ID(), ProtocolVersion: ProtocolVersion, Image: imageInfo{
		Entrypoint: nonNil(img.Entrypoint), Cmd: nonNil(img.Cmd), Env: nonNil(img.Env), Workdir: img.WorkingDir, User: img.User,
	}}, nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// watch notices a VM that exits on its own (crash, guest poweroff): its
// requests fail with CodeSandboxClosed and the client gets sandbox_exited.
func (s *session) watch(e *entry) {
	defer s.wg.Done()
	select {
	case <-e.sb.Done():
	case <-e.ctx.Done():
		return
	}
	id := e.sb.ID()
	s.mu.Lock()
	mine := s.sandboxes[id] == e
	if mine {
		delete(s.sandboxes, id)
	}
	s.mu.Unlock()
	if !mine {
		return
	}
	e.cancel(errSandboxExited)
	e.sb.Close()
	s.out.notify("sandbox_exited", map[string]string{"id": id})
}

type idParams struct {
	ID string `json:"id"`
}

func handleClose(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	var p idParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	if p.ID == "" {
		return nil, errorf(CodeInvalidParams, `invalid params: "id" (the sandbox id) is required`)
	}
	s.mu.Lock()
	e := s.sandboxes[p.ID]
	delete(s.sandboxes, p.ID)
	s.mu.Unlock()
	if e == nil {
		return nil, errorf(CodeUnknownSandbox, "no sandbox %q in this session", p.ID)
	}
	e.cancel(errSandboxClosed) // fails its requests and write handles
	if err := e.sb.Close(); err != nil {
		return nil, fmt.Errorf("close %s: %w", p.ID, err)
	}
	return struct{}{}, nil
}

// --- network: allow list and port forwarding --------------------------------

type allowParams struct {
	ID    string   `json:"id"`
	Hosts []string `json:"hosts"`
}

func handleAllowListAdd(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	return s.allowList(c, raw, true)
}

func handleAllowListDelete(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	return s.allowList(c, raw, false)
}

func (s *session) allowList(c *call, raw json.RawMessage, add bool) (any, error) {
	var p allowParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	if len(p.Hosts) == 0 {
		return nil, errorf(CodeInvalidParams, `invalid params: "hosts" (a list of host patterns) is required`)
	}
	e, untie, err := s.lookup(c, p.ID)
	if err != nil {
		return nil, err
	}
	defer untie()
	al, ok := e.sb.(allowLister)
	if !ok {
		return nil, errorf(CodeNotSupported, "changing the allow-list of a running sandbox is not supported by this backend")
	}
	if add {
		err = al.AllowHosts(p.Hosts...)
	} else {
		err = al.DenyHosts(p.Hosts...)
	}
	if err != nil {
		return nil, networkError(err)
	}
	allow, private, err := al.AllowList()
	if err != nil {
		return nil, networkError(err)
	}
	return map[string]any{"allow_hosts": nonNil(allow), "allow_private": nonNil(private)}, nil
}

// networkError classifies the sandbox's network errors: no NIC is
// CodeNotSupported, anything else (a bad pattern, a pattern not in the
// list) is the caller's mistake.
func networkError(err error) error {
	if errors.Is(err, sandbox.ErrNoNetwork) {
		return errorf(CodeNotSupported, "%v", err)
	}
	return errorf(CodeInvalidParams, "invalid params: %v", err)
}

type portForwardParams struct {
	ID        string `json:"id"`
	GuestPort int    `json:"guest_port"`
	// HostAddr is "IP:PORT" to listen on; default "127.0.0.1:0" (any free
	// port on the loopback, reported in the result).
	HostAddr string `json:"host_addr"`
}

func handlePortForward(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	var p portForwardParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	if p.GuestPort < 1 || p.GuestPort > 65535 {
		return nil, errorf(CodeInvalidParams, `invalid params: "guest_port" %d: want 1 to 65535`, p.GuestPort)
	}
	spec := sandbox.PortSpec{HostIP: "127.0.0.1", GuestPort: uint16(p.GuestPort)}
	if p.HostAddr != "" {
		host, port, err := net.SplitHostPort(p.HostAddr)
		n, perr := strconv.ParseUint(port, 10, 16)
		if err != nil || perr != nil || net.ParseIP(host) == nil {
			return nil, errorf(CodeInvalidParams, `invalid params: "host_addr" %q: want IP:PORT, e.g. "127.0.0.1:8080" (port 0: any free port)`, p.HostAddr)
		}
		spec.HostIP, spec.HostPort = host, uint16(n)
	}
	e, untie, err := s.lookup(c, p.ID)
	if err != nil {
		return nil, err
	}
	defer untie()
	pub, ok := e.sb.(publisher)
	if !ok {
		return nil, errorf(CodeNotSupported, "port forwarding is not supported by this backend")
	}
	// The forward lives as long as the sandbox (Close removes it).
	f, err := pub.Publish(spec)
	if err != nil {
		if errors.Is(err, sandbox.ErrNoNetwork) {
			return nil, errorf(CodeNotSupported, "%v", err)
		}
		return nil, err
	}
	return map[string]any{"host_addr": f.Addr, "guest_port": p.GuestPort}, nil
}
