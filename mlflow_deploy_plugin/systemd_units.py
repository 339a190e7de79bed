"""The systemd user units that run ``mlflow-deploy up`` at boot and every 5 minutes.

``up`` starts each deployment's supervisor detached, and a detached process stays in the control
group of the unit that started it. Started from a plain one-shot unit (the usual way to run a
command from a timer), every supervisor is a process left over from a unit that has ended:
systemd logs "Unit process ... remains running after unit stopped" when each run ends and "Found
left-over process ... in control group while starting unit" when the next one starts, every
5 minutes for every process. So the units follow the pattern of ``nftables.service``: a one-shot
unit that stays active after its command returned (``RemainAfterExit=yes``) owns what it started,
and the periodic run is a *reload* of that unit (``ExecReload=``), whose processes belong to it
too. The timer starts a tiny helper that asks for that reload (``try-reload-or-restart``: nothing
while the main unit is stopped).

``systemctl --user stop`` of the main unit stops the healing, not the deployments
(``KillMode=process``, and its main process has long exited): a deployment is stopped or
deleted with ``mlflow deployments delete``, never as a side effect of managing the unit. The one
place systemd then notes their processes as left over is a deliberate stop and start of the unit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_SERVICE = """\
# {unit}.service - bring every mlflow-deploy deployment back to running, at boot, and every
# 5 minutes when {unit}.timer reloads it (through {unit}-heal.service).
# Install (as the user that owns the deployments):
#   mlflow-deploy up --print-systemd-unit --write-to ~/.config/systemd/user
#   systemctl --user daemon-reload && systemctl --user enable --now {unit}.service {unit}.timer
#   loginctl enable-linger "$USER"    # start at boot, before anyone logs in
# Tokens (-C auth_token_env=...) go in the EnvironmentFile, readable by that user only (chmod 600).
# The supervisors `up` starts belong to this unit: it stays active once `up` returned, and each
# periodic run is a reload of it. `systemctl --user stop {unit}.service` stops the healing only;
# the deployments keep serving (stop one with `mlflow deployments delete`).
[Unit]
Description=Bring mlflow-deploy deployments back to running
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=MLFLOW_DEPLOY_HOME={home}
EnvironmentFile=-%h/.config/mlflow-deploy/env
ExecStart={executable} up
ExecReload={executable} up
KillMode=process

[Install]
WantedBy=default.target
"""

_HEAL = """\
# {unit}-heal.service - started by {unit}.timer: `up` again, as a reload of {unit}.service
# (so what it starts belongs to that unit). Does nothing while {unit}.service is stopped.
[Unit]
Description=Run mlflow-deploy up again (as a reload of {unit}.service)

[Service]
Type=oneshot
ExecStart={systemctl} --user try-reload-or-restart {unit}.service
"""

_TIMER = """\
# {unit}.timer - every 5 minutes, `mlflow-deploy up` again (through {unit}-heal.service).
[Unit]
Description=Run mlflow-deploy up every 5 minutes

[Timer]
OnActiveSec=5min
OnUnitActiveSec=5min
Unit={unit}-heal.service

[Install]
WantedBy=timers.target
"""


def systemd_units(home: Path, executable: str, unit: str = "mlflow-deploy-up") -> dict[str, str]:
    """The units that run `mlflow-deploy up` at boot and every 5 minutes, by file name: the
    service that owns the deployments' processes, its periodic reload helper, and the timer."""
    systemctl = shutil.which("systemctl") or "/usr/bin/systemctl"
    values = {"home": home, "executable": executable, "unit": unit, "systemctl": systemctl}
    return {f"{unit}.service": _SERVICE.format(**values),
            f"{unit}-heal.service": _HEAL.format(**values),
            f"{unit}.timer": _TIMER.format(**values)}
