package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/internal/initramfs"
	"matchlock.dev/matchlock/internal/paths"
	"matchlock.dev/matchlock/internal/version"
	"matchlock.dev/matchlock/kernel"
	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/vmm/qemu"
)

func init() {
	register(newDiagnoseCmd)
	register(newVersionCmd)
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the matchlock version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "matchlock %s (protocol %d, %s, %s/%s)\n",
				version.Version, version.Protocol, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		},
	}
}

type check struct {
	name, detail, fix string
	ok                bool
}

func newDiagnoseCmd() *cobra.Command {
	var kernelFlag string
	cmd := &cobra.Command{
		Use:   "diagnose",
		Short: "Check that this host can run sandboxes, and say how to fix what is missing",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			checks := diagnose(cmd.Context(), kernelFlag)
			failed := printChecks(cmd.OutOrStdout(), checks)
			if failed > 0 {
				return &ExitError{Code: 1, Err: fmt.Errorf("%d check(s) failed", failed)}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&kernelFlag, "kernel", "", "guest kernel to check (default: $MATCHLOCK_KERNEL, else the built one)")
	return cmd
}

func printChecks(w io.Writer, checks []check) int {
	failed := 0
	for _, c := range checks {
		status := "ok  "
		if !c.ok {
			status = "FAIL"
			failed++
		}
		fmt.Fprintf(w, "%s %-14s %s\n", status, c.name, c.detail)
		if !c.ok && c.fix != "" {
			fmt.Fprintf(w, "     %-14s fix: %s\n", "", c.fix)
		}
	}
	return failed
}

func diagnose(ctx context.Context, kernelFlag string) []check {
	if ctx == nil {
		ctx = context.Background()
	}
	var cs []check
	// QEMU
	if p, err := exec.LookPath(qemu.Binary); err != nil {
		cs = append(cs, check{name: "qemu", detail: qemu.Binary + " not on PATH", fix: "apt-get install qemu-system-x86"})
	} else {
		out, _ := exec.Command(p, "--version").Output()
		first, _, _ := strings.Cut(string(out), "\n")
		cs = append(cs, check{name: "qemu", ok: true, detail: fmt.Sprintf("%s (%s)", strings.TrimSpace(first), p)})
	}
	// mkfs.ext4 for writable layers
	if p, err := exec.LookPath("mkfs.ext4"); err != nil {
		cs = append(cs, check{name: "mkfs.ext4", detail: "not on PATH", fix: "apt-get install e2fsprogs"})
	} else {
		cs = append(cs, check{name: "mkfs.ext4", ok: true, detail: p})
	}
	// kernel
	kpath, kerr := kernel.Find(kernelFlag)
	if kerr != nil {
		cs = append(cs, check{name: "kernel", detail: kerr.Error(), fix: "run kernel/build.sh from the source tree (about 5 minutes), or set " + kernel.Env})
	} else {
		fi, _ := os.Stat(kpath)
		cs = append(cs, check{name: "kernel", ok: true, detail: fmt.Sprintf("%s (%.1f MB)", kpath, float64(fi.Size())/1e6)})
	}
	// guest agent
	apath, aerr := sandbox.FindAgent("")
	if aerr != nil {
		cs = append(cs, check{name: "guest agent", detail: aerr.Error(), fix: "run 'make build' and use bin/matchlock"})
	} else {
		cs = append(cs, check{name: "guest agent", ok: true, detail: apath})
	}
	// acceleration
	if kerr == nil && aerr == nil {
		initrd, err := initramfs.Build(apath, filepath.Join(paths.CacheDir(), "initramfs"))
		if err != nil {
			cs = append(cs, check{name: "acceleration", detail: err.Error(), fix: "check that the cache directory is writable"})
		} else {
			v := (&qemu.Backend{}).DetectAccel(ctx, kpath, initrd, paths.CacheDir())
			detail := strings.ToUpper(v.Accel) + ": " + v.Reason
			if v.Cached {
				detail += " (cached verdict)"
			}
			// TCG works, only slower: it is not a failure.
			cs = append(cs, check{name: "acceleration", ok: true, detail: detail})
		}
	} else {
		cs = append(cs, check{name: "acceleration", detail: "not checked: needs the kernel and the guest agent", fix: "fix the checks above first"})
	}
	// directories and space
	for _, d := range []struct{ name, dir string }{{"cache dir", paths.CacheDir()}, {"state dir", paths.StateDir()}} {
		cs = append(cs, dirCheck(d.name, d.dir))
	}
	return cs
}

func dirCheck(name, dir string) check {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return check{name: name, detail: err.Error(), fix: "make " + dir + " writable, or point MATCHLOCK_CACHE / MATCHLOCK_HOME elsewhere"}
	}
	probe, err := os.CreateTemp(dir, ".diagnose-*")
	if err != nil {
		return check{name: name, detail: dir + " is not writable: " + err.Error(), fix: "make " + dir + " writable, or point MATCHLOCK_CACHE / MATCHLOCK_HOME elsewhere"}
	}
	probe.Close()
	os.Remove(probe.Name())
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return check{name: name, detail: err.Error()}
	}
	free := float64(st.Bavail) * float64(st.Bsize) / (1 << 30)
	c := check{name: name, ok: free >= 2, detail: fmt.Sprintf("%s (%.1f GiB free)", dir, free)}
	if !c.ok {
		c.fix = "free disk space: images and writable layers need at least 2 GiB (try 'matchlock image prune')"
	}
	return c
}
