// Package trust decides whether fwpd may trust a file or directory it
// loads policy from, keeps state in or serves on: one that another local
// user can write or replace is refused, the way sshd's StrictModes and
// systemd's StateDirectory= refuse them.
//
// A path is trusted when it and every directory the lookup walks through
// (the literal path's and, across symbolic links, the resolved one's) are
// owned by root or by the effective user, and none is writable by group
// or other, except an ancestor with the sticky bit (like /tmp): there
// others may add names, but not rename or remove ours.
package trust
