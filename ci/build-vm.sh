#!/usr/bin/env bash
# The pieces lab nodes with `engine: kernel` boot from (qemu guests with a real WireGuard module),
# built once into $WIREKUBE_CACHE/vm (default ~/.cache/wirekube/vm), from Debian packages only:
#   - qemu-system-x86, busybox-static and cpio installed on the host (apt);
#   - a Debian kernel package (linux-image-6.1.0-*-amd64) downloaded and unpacked with
#     dpkg-deb -x, never installed into the host; depmod run on the unpacked tree so that
#     modprobe works inside the guest;
#   - an initramfs: busybox-static, the modules needed to reach the host's root over 9p
#     (virtio, virtio_net, 9p) in dependency order, and /init from python/wirekube/lab/vm_init.sh.
# Output: $CACHE/vm/current -> vm/<kernel version>/{vmlinuz,initrd.img,modules/lib/modules/<v>}.
# Idempotent; a finished build is reused (the initramfs is rebuilt when vm_init.sh changes).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="${WIREKUBE_CACHE:-$HOME/.cache/wirekube}"
VMDIR="$CACHE/vm"
say() { printf '[build-vm] %s\n' "$1" >&2; }

APT=(qemu-system-x86 busybox-static cpio kmod)
missing=()
for p in "${APT[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The kernel package: pinned by WIREKUBE_VM_KERNEL (e.g. linux-image-6.1.0-57-amd64), else what
# Debian's linux-image-amd64 points at; a cached build of any version is reused without asking apt.
pkg="${WIREKUBE_VM_KERNEL:-}"
if [[ -z $pkg && -L $VMDIR/current && -f $VMDIR/current/vmlinuz ]]; then
  pkg=$(cat "$VMDIR/current/package")
fi
if [[ -z $pkg ]]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -1)
  [[ -n $pkg ]] || { echo "build-vm: cannot find the Debian kernel package (apt-cache depends linux-image-amd64)" >&2; exit 1; }
fi
version=${pkg#linux-image-}
out="$VMDIR/$version"
mods="$out/modules/lib/modules/$version"

if [[ ! -f $out/vmlinuz || ! -f $mods/modules.dep ]]; then
  say "downloading and unpacking $pkg (not installed into the host)"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp/deb"
  (cd "$out.tmp/deb" && apt-get download -qq "$pkg" >/dev/null)
  dpkg-deb -x "$out.tmp"/deb/*.deb "$out.tmp/x"
  mkdir -p "$out.tmp/modules/lib/modules"
  mv "$out.tmp/x/lib/modules/$version" "$out.tmp/modules/lib/modules/"
  mv "$out.tmp/x/boot/vmlinuz-$version" "$out.tmp/vmlinuz"
  depmod -b "$out.tmp/modules" "$version"
  echo "$pkg" > "$out.tmp/package"
  rm -rf "$out.tmp/x" "$out.tmp/deb"
  rm -rf "$out"; mv "$out.tmp" "$out"
fi

init="$ROOT/python/wirekube/lab/vm_init.sh"
if [[ ! -f $out/initrd.img || $init -nt $out/initrd.img || $0 -nt $out/initrd.img ]]; then
  say "packing the initramfs (busybox-static, virtio/9p modules, /init)"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  mkdir -p "$work"/{bin,dev,proc,sys,host,mods}
  cp /bin/busybox "$work/bin/busybox"
  for applet in sh mount umount insmod mkdir cat echo sleep chroot switch_root mknod ln poweroff reboot; do
    ln -s busybox "$work/bin/$applet"
  done
  # Modules to reach the host's root over 9p and the LAN: dependency order from modprobe itself.
  : > "$work/mods/order"
  for m in virtio_pci virtio_net 9pnet_virtio 9p; do
    modprobe -d "$out/modules" -S "$version" --show-depends "$m" | while read -r kind path _; do
      [[ $kind == insmod ]] || continue
      base=$(basename "$path")
      grep -qx "$base" "$work/mods/order" && continue
      cp "$path" "$work/mods/$base"
      echo "$base" >> "$work/mods/order"
    done
  done
  # Compressed modules (.ko.xz) are loaded by the kernel itself only if built with that support;
  # busybox insmod cannot read them, so unpack.
  for f in "$work"/mods/*.ko.xz; do [[ -e $f ]] && xz -d "$f"; done
  sed -i 's/\.ko\.xz$/.ko/' "$work/mods/order"
  install -m 0755 "$init" "$work/init"
  (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.img.tmp"
  mv "$out/initrd.img.tmp" "$out/initrd.img"
fi
ln -sfn "$version" "$VMDIR/current"
say "guest kernel $version ready in $VMDIR/current"
