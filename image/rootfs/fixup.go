package rootfs

import (
	"encoding/binary"
	"fmt"
	"io"
)

// setInodeBitmapPadding sets the bits past the last inode of each group in
// its inode bitmap, as mke2fs does; the ext4 writer leaves them clear, which
// the kernel ignores but e2fsck reports ("Padding at end of inode bitmap is
// not set"). A clean e2fsck is what the tests check images against.
//
// Superblock at byte 1024 (ext4 disk layout): s_blocks_count_lo @4,
// s_first_data_block @20, s_log_block_size @24, s_blocks_per_group @32,
// s_inodes_per_group @40, s_feature_incompat @96 (0x80 = 64bit), s_desc_size
// @254. Group descriptors follow the superblock's block; bg_inode_bitmap_lo
// is at offset 4 of each.
func setInodeBitmapPadding(f io.ReadWriteSeeker) error {
	var sb [1024]byte
	if err := readAt(f, sb[:], 1024); err != nil {
		return fmt.Errorf("read superblock: %w", err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[56:]) != 0xEF53 {
		return fmt.Errorf("not an ext4 superblock")
	}
	blocks := int64(le.Uint32(sb[4:]))
	firstData := int64(le.Uint32(sb[20:]))
	blockSize := int64(1024) << le.Uint32(sb[24:])
	perGroup := int64(le.Uint32(sb[32:]))
	inodesPerGroup := int64(le.Uint32(sb[40:]))
	descSize := int64(32)
	if le.Uint32(sb[96:])&0x80 != 0 {
		descSize = int64(le.Uint16(sb[254:]))
	}
	if blockSize > 65536 || perGroup == 0 || inodesPerGroup > blockSize*8 || descSize < 32 {
		return fmt.Errorf("unexpected ext4 geometry")
	}
	groups := (blocks - firstData + perGroup - 1) / perGroup
	gdt := (firstData + 1) * blockSize
	bitmap := make([]byte, blockSize)
	for g := int64(0); g < groups; g++ {
		var desc [8]byte
		if err := readAt(f, desc[:], gdt+g*descSize); err != nil {
			return fmt.Errorf("read group descriptor %d: %w", g, err)
		}
		at := int64(le.Uint32(desc[4:])) * blockSize
		if err := readAt(f, bitmap, at); err != nil {
			return fmt.Errorf("read inode bitmap %d: %w", g, err)
		}
		for i := inodesPerGroup; i < blockSize*8; i++ {
			bitmap[i/8] |= 1 << (i % 8)
		}
		if _, err := f.Seek(at, io.SeekStart); err != nil {
			return err
		}
		if _, err := f.Write(bitmap); err != nil {
			return fmt.Errorf("write inode bitmap %d: %w", g, err)
		}
	}
	return nil
}

func readAt(f io.ReadSeeker, b []byte, off int64) error {
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return err
	}
	_, err := io.ReadFull(f, b)
	return err
}
