"""The edge daemon that runs on each site's device."""
