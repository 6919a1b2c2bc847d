echo "readfile script: user $(id -un), STANDIN_FROM_BASHRC=${STANDIN_FROM_BASHRC:-unset}"
for i in 1 2 3; do echo "readfile script: line $i"; done
echo "readfile script: the last line"
