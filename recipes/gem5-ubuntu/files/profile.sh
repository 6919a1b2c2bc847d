# The gem5 post-boot step: the gem5 user's interactive login shell (the serial-console
# autologin) runs gem5-after-boot, which runs only once per boot. Sourced by login
# shells: no exit here.
if [ "$(id -un)" = gem5 ] && [ -x /usr/local/bin/gem5-after-boot ]; then
    case $- in
        *i*) /usr/local/bin/gem5-after-boot ;;
    esac
fi
