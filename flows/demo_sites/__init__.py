"""Demo hospitals: simulated raw exports of records, device data and images, with faults and PHI."""
