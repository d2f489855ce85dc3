package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/vmm"
)

// ProbeMarker is what the guest agent prints in probe mode.
const ProbeMarker = "MATCHLOCK-PROBE-OK"

// ProbeTimeout bounds the KVM probe boot. A working KVM boots the probe in
// well under a second; a broken nested hypervisor hangs forever.
const ProbeTimeout = 4 * time.Second

// Verdict is the outcome of acceleration detection.
type Verdict struct {
	Accel  string `json:"accel"`  // "kvm" or "tcg"
	Reason string `json:"reason"` // why, in one line
	Cached bool   `json:"-"`      // true when read from the verdict cache
}

// DetectAccel decides between KVM and TCG. KVM is used only when a probe
// boot of the real kernel succeeds under it: /dev/kvm existing is not
// enough (a nested paravirtual hypervisor may accept VMs and never boot
// one). The verdict is cached under cacheDir keyed by everything it depends
// on, so no run pays for the probe twice.
func (b *Backend) DetectAccel(ctx context.Context, kernelPath, initrdPath, cacheDir string) Verdict {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return Verdict{Accel: "tcg", Reason: fmt.Sprintf("KVM unavailable (%v)", unwrapPathErr(err))}
	}
	f.Close()

	key := b.verdictKey(kernelPath)
	cacheFile := filepath.Join(cacheDir, "accel", key+".json")
	if data, err := os.ReadFile(cacheFile); err == nil {
		var v Verdict
		if json.Unmarshal(data, &v) == nil && (v.Accel == "kvm" || v.Accel == "tcg") {
			v.Cached = true
			return v
		}
	}
	v := b.probe(ctx, kernelPath, initrdPath)
	if data, err := json.Marshal(v); err == nil {
		os.MkdirAll(filepath.Dir(cacheFile), 0o755)
		tmp := fmt.Sprintf("%s.%d.tmp", cacheFile, os.Getpid())
		if os.WriteFile(tmp, data, 0o644) == nil {
			os.Rename(tmp, cacheFile)
		}
	}
	return v
}

func (b *Backend) probe(ctx context.Context, kernelPath, initrdPath string) Verdict {
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "matchlock-probe-")
	if err != nil {
		return Verdict{Accel: "tcg", Reason: "KVM probe could not run: " + err.Error()}
	}
	defer os.RemoveAll(dir)
	var console lockedBuffer
	m, err := b.start(ctx, vmm.Spec{
		Kernel: kernelPath, Initrd: initrdPath, Cmdline: []string{"matchlock.probe"},
		CPUs: 1, MemoryMiB: 128, RunDir: dir, Accel: "kvm", ConsoleLog: &console,
	})
	if err != nil {
		return Verdict{Accel: "tcg", Reason: "KVM probe failed to start: " + err.Error()}
	}
	defer m.Kill()
	select {
	case <-m.Done():
	case <-ctx.Done():
		return Verdict{Accel: "tcg", Reason: fmt.Sprintf("/dev/kvm exists but a probe guest did not boot within %s", ProbeTimeout)}
	}
	if strings.Contains(console.String(), ProbeMarker) {
		return Verdict{Accel: "kvm", Reason: "KVM probe boot succeeded"}
	}
	why := "no output"
	if s := strings.TrimSpace(m.Stderr()); s != "" {
		why = lastLine(s)
	}
	return Verdict{Accel: "tcg", Reason: "/dev/kvm exists but a probe guest failed: " + why}
}

// verdictKey hashes what the verdict depends on: the QEMU binary, the
// kernel, and the host kernel.
func (b *Backend) verdictKey(kernelPath string) string {
	h := sha256.New()
	bin := b.Binary
	if bin == "" {
		bin = Binary
	}
	if p, err := exec.LookPath(bin); err == nil {
		if fi, err := os.Stat(p); err == nil {
			fmt.Fprintf(h, "qemu %s %d %d\n", p, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	if fi, err := os.Stat(kernelPath); err == nil {
		fmt.Fprintf(h, "kernel %s %d %d\n", kernelPath, fi.Size(), fi.ModTime().UnixNano())
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		fmt.Fprintf(h, "host %s %s\n", bytes.TrimRight(u.Release[:], "\x00"), bytes.TrimRight(u.Version[:], "\x00"))
	}
	return hex.EncodeToString(h.Sum(nil)[:12])
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() < 1<<20 {
		l.b.Write(p)
	}
	return len(p), nil
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
