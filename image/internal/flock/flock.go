// Package flock takes advisory whole-file locks (flock(2)) on lock files, so
// that matchlock processes sharing a store can order their work. A lock dies
// with its process: a killed process never leaves a store locked.
package flock

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Lock is a held lock. Each Lock has its own open file description, so two
// goroutines of one process exclude each other as two processes do.
type Lock struct{ f *os.File }

// Shared and Exclusive name the two lock modes.
const (
	Shared    = unix.LOCK_SH
	Exclusive = unix.LOCK_EX
)

// Acquire locks path (created if missing) in mode, waiting until it is free
// or ctx is done.
func Acquire(ctx context.Context, path string, mode int) (*Lock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	wait := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), mode|unix.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 100*time.Millisecond)
	}
}

// TryFile locks an already open file exclusively without waiting; false if
// another holder has it.
func TryFile(f *os.File) (bool, error) {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return false, nil
	}
	return err == nil, err
}

// Release drops the lock.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last descriptor releases the flock
	l.f = nil
	return err
}
